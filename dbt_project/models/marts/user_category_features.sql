-- Each user's affinity to each category before each cutoff: the share of their decayed interest.
-- Rolled up from user_item_features (one row per user and item), much smaller than the events.
with

user_items as (

    select * from {{ ref('user_item_features') }}

),

items as (

    select item_id, category_id from {{ ref('stg_lake__items') }}

),

per_category as (

    select
        user_items.as_of,
        user_items.user_id,
        items.category_id,
        sum(user_items.views + user_items.carts + user_items.purchases) as events,
        sum(user_items.purchases) as purchases,
        min(user_items.days_since_last) as days_since_last,
        sum(user_items.interest) as interest
    from user_items
    inner join items
        on items.item_id = user_items.item_id
    group by user_items.as_of, user_items.user_id, items.category_id

),

final as (

    select
        *,
        interest / nullif(sum(interest) over (partition by as_of, user_id), 0) as affinity
    from per_category

)

select * from final
