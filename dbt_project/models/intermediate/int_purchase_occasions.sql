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

final as (

    select
        *,
        row_number() over (
            partition by as_of, user_id, item_id order by occurred_at, occasion_id
        ) as nth_occasion,
        {{ days_between(
            'lag(occurred_at) over (partition by as_of, user_id, item_id '
            ~ 'order by occurred_at, occasion_id)',
            'occurred_at'
        ) }} as gap_days
    from occasions

)

select * from final
