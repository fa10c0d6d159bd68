-- Impressions as logged by the service, cast to their contract types; an impression logged twice
-- (the same response and item) counts once.
with source as (

    select * from {{ source('lake', 'impressions') }}

),

renamed as (

    select
        cast(rec_id as varchar) as rec_id,
        cast(shown_at as timestamptz) as shown_at,
        cast(user_id as varchar) as user_id,
        cast(item_id as varchar) as item_id,
        cast(position as integer) as position,
        cast(model_version as varchar) as model_version,
        cast(strategy as varchar) as strategy,
        cast(fallback_level as tinyint) as fallback_level,
        cast(experiment as varchar) as experiment,
        cast(arm as varchar) as arm,
        cast(drafted_by as varchar) as drafted_by
    from source

),

final as (

    select *
    from renamed
    qualify row_number() over (partition by rec_id, item_id order by shown_at, position) = 1

)

select * from final
