-- Events as delivered, cast to their contract types, deduplicated by event_id (deliveries are
-- at-least-once: the first delivery of an event_id wins). A table in the warehouse: every mart
-- reads it, and deduplicating once is much cheaper than once per mart.
{{ config(materialized='table') }}
with source as (

    select * from {{ source('lake', 'events') }}

),

renamed as (

    select
        cast(event_id as varchar) as event_id,
        cast(occurred_at as timestamptz) as occurred_at,
        cast(user_id as varchar) as user_id,
        cast(session_id as varchar) as session_id,
        cast(item_id as varchar) as item_id,
        cast(event_type as varchar) as event_type,
        cast(quantity as integer) as quantity,
        cast(price as double) as price,
        cast(rec_id as varchar) as rec_id,
        cast(source as varchar) as source
    from source

),

final as (

    select *
    from renamed
    qualify row_number() over (partition by event_id order by occurred_at, item_id) = 1

)

select * from final
