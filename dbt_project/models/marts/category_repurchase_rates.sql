-- How repeatable each category is, learned from data: the share of its purchases before each
-- cutoff that were repeat purchases of an item the same user had bought before.
with

purchases as (

    select
        events.as_of,
        events.user_id,
        events.item_id,
        items.category_id,
        row_number() over (
            partition by events.as_of, events.user_id, events.item_id
            order by events.occurred_at, events.event_id
        ) as nth_purchase
    from {{ ref('int_events_before_cutoffs') }} as events
    inner join {{ ref('stg_lake__items') }} as items
        on items.item_id = events.item_id
    where events.event_type = 'purchase'

),

final as (

    select
        as_of,
        category_id,
        count(*) as purchases,
        count(*) filter (where nth_purchase > 1) as repeat_purchases,
        -- Smoothed towards 0 so that a category with two purchases is not "fully repeatable".
        count(*) filter (where nth_purchase > 1) / (count(*) + 10.0) as repeat_rate
    from purchases
    group by as_of, category_id

)

select * from final
