-- Registered users cast to their contract types.
with source as (

    select * from {{ source('lake', 'users') }}

),

final as (

    select
        cast(user_id as varchar) as user_id,
        cast(signed_up_at as timestamptz) as signed_up_at,
        cast(country as varchar) as country,
        cast(device as varchar) as device
    from source

)

select * from final
