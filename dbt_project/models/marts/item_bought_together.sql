-- "Bought together": items added to the cart or bought by the same user within a day of each
-- other before each cutoff, decayed by time; top-N partners per item.
-- The pairs of events are computed once (`int_bought_together_pairs`); a cutoff sees the pairs
-- whose later event precedes it, each scored by the decay of its earlier event (the smaller of
-- the two events' decays).
with

cutoffs as (

    select as_of from {{ ref('int_cutoffs') }}

),

pairs as (

    select
        cutoffs.as_of,
        event_pairs.item_id,
        event_pairs.neighbour_item_id,
        {{ exact_sum(time_decay(days_between('event_pairs.first_at', 'cutoffs.as_of'))) }}
            as score,
        count(*) filter (where event_pairs.is_users_first) as users
    from {{ ref('int_bought_together_pairs') }} as event_pairs
    inner join cutoffs
        on event_pairs.last_at < cutoffs.as_of
    group by cutoffs.as_of, event_pairs.item_id, event_pairs.neighbour_item_id

),

{{ top_neighbours('pairs') }}

select * from final
