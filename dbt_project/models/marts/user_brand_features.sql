-- Each user's affinity to each brand before each cutoff: counts, recency and share of interest.
-- Rolled up from user_item_features (one row per user and item), much smaller than the events.
with

user_items as (

    select * from {{ ref('user_item_features') }}

),

items as (

    select item_id, brand from {{ ref('stg_lake__items') }} where brand is not null

),

per_brand as (

    select
        user_items.as_of,
        user_items.user_id,
        items.brand,
        sum(user_items.views + user_items.carts + user_items.purchases) as events,
        sum(user_items.purchases) as purchases,
        min(user_items.days_since_last) as days_since_last,
        sum(user_items.interest) as interest
    from user_items
    inner join items
        on items.item_id = user_items.item_id
    group by user_items.as_of, user_items.user_id, items.brand

),

final as (

    select
        *,
        interest / nullif(sum(interest) over (partition by as_of, user_id), 0) as affinity
    from per_brand

)

select * from final
