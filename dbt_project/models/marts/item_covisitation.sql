-- Items seen together in sessions before each cutoff ("viewed this, also viewed"), weighted by
-- the neighbour's strongest event type in the session and decayed by time; top-N per item.
with

session_items as (

    select
        as_of,
        session_id,
        item_id,
        max(event_weight) as event_weight,
        max(decay) as decay,
        count(*) over (partition by as_of, session_id) as session_size
    from {{ ref('int_events_before_cutoffs') }}
    -- Older sessions weigh little after time decay (3 half-lives by default: 12%) but cost the
    -- most: the pairs grow with the square of session length, for every cutoff.
    where age_days < {{ var('covisitation_lookback_days') }}
    group by as_of, session_id, item_id

),

-- Very long sessions (crawlers, shared devices) would dominate quadratically: leave them out.
usable_session_items as (

    select * from session_items where session_size <= 100

),

pairs as (

    select
        anchor.as_of,
        anchor.item_id,
        neighbour.item_id as neighbour_item_id,
        {{ exact_sum('neighbour.event_weight * least(anchor.decay, neighbour.decay)') }} as score,
        count(*) as sessions
    from usable_session_items as anchor
    inner join usable_session_items as neighbour
        on neighbour.as_of = anchor.as_of
        and neighbour.session_id = anchor.session_id
        and neighbour.item_id <> anchor.item_id
    group by anchor.as_of, anchor.item_id, neighbour.item_id

),

{{ top_neighbours('pairs') }}

select * from final
