-- What each user did with each item before each cutoff: the history behind "continue shopping"
-- and "buy again".
with

events as (

    select * from {{ ref('int_events_before_cutoffs') }}

),

final as (

    select
        as_of,
        user_id,
        item_id,
        count(*) filter (where event_type = 'view') as views,
        count(*) filter (where event_type = 'add_to_cart') as carts,
        count(*) filter (where event_type = 'purchase') as purchases,
        min(age_days) as days_since_last,
        {{ exact_sum('event_weight * decay') }} as interest
    from events
    group by as_of, user_id, item_id

)

select * from final
