-- Each user's affinity to each brand before each cutoff: counts, recency and share of interest.
with

events as (

    select * from {{ ref('int_events_before_cutoffs') }}

),

items as (

    select item_id, brand from {{ ref('stg_lake__items') }} where brand is not null

),

per_brand as (

    select
        events.as_of,
        events.user_id,
        items.brand,
        count(*) as events,
        count(*) filter (where events.event_type = 'purchase') as purchases,
        min(events.age_days) as days_since_last,
        sum(events.event_weight * events.decay) as interest
    from events
    inner join items
        on items.item_id = events.item_id
    group by events.as_of, events.user_id, items.brand

),

final as (

    select
        *,
        interest / nullif(sum(interest) over (partition by as_of, user_id), 0) as affinity
    from per_brand

)

select * from final
