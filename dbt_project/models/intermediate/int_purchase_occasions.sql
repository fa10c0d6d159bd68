-- Each user's purchase occasions of each item before each cutoff, with the gap since the user's
-- previous occasion of the same item. The purchases of one item in one session (one basket, one
-- order) are one occasion: two receipt lines of the same product are not a re-purchase after
-- zero days. Events without a session are an occasion each.
with

purchases as (

    select * from {{ ref('int_events_before_cutoffs') }}
    where event_type = 'purchase'

),

occasions as (

    select
        as_of,
        user_id,
        item_id,
        coalesce(session_id, event_id) as occasion_id,
        min(occurred_at) as occurred_at
    from purchases
    group by as_of, user_id, item_id, coalesce(session_id, event_id)

),

-- The user's baskets (occasions of any item) numbered in time order: how many baskets the
-- user has filled since they first bought an item is the denominator of its basket share.
baskets as (

    select
        as_of,
        user_id,
        occasion_id,
        row_number() over (
            partition by as_of, user_id order by min(occurred_at), occasion_id
        ) as basket_number
    from occasions
    group by as_of, user_id, occasion_id

),

final as (

    select
        occasions.*,
        baskets.basket_number,
        row_number() over (
            partition by as_of, user_id, item_id order by occurred_at, occasion_id
        ) as nth_occasion,
        {{ days_between(
            'lag(occurred_at) over (partition by as_of, user_id, item_id '
            ~ 'order by occurred_at, occasion_id)',
            'occurred_at'
        ) }} as gap_days
    from occasions
    inner join baskets using (as_of, user_id, occasion_id)

)

select * from final
