-- "Bought together": items added to the cart or bought by the same user within a day of each
-- other before each cutoff, decayed by time; top-N partners per item.
-- The pairs of events are computed once (`int_bought_together_pairs`); a cutoff sees the pairs
-- whose later event precedes it, each scored by the decay of its earlier event (the smaller of
-- the two events' decays).
with

cutoffs as (

    select as_of from {{ ref('int_cutoffs') }}

),

-- Each pair of events is repeated for the cutoffs it precedes (a list filter, not a range join:
-- no sort of the pairs).
pairs_at_cutoffs as (

    select
        unnest(list_filter(cutoff_list.as_ofs, lambda cutoff: event_pairs.last_at < cutoff)) as as_of,
        event_pairs.item_id,
        event_pairs.neighbour_item_id,
        event_pairs.first_at,
        event_pairs.is_users_first
    from {{ ref('int_bought_together_pairs') }} as event_pairs
    cross join (select list(as_of) as as_ofs from cutoffs) as cutoff_list

),

pairs as (

    select
        as_of,
        item_id,
        neighbour_item_id,
        {{ exact_sum(time_decay(days_between('first_at', 'as_of'))) }} as score,
        count(*) filter (where is_users_first) as users
    from pairs_at_cutoffs
    group by as_of, item_id, neighbour_item_id

),

{{ top_neighbours('pairs') }}

select * from final
