-- "Bought together": items added to the cart or bought by the same user within a day of each
-- other before each cutoff, decayed by time; top-N partners per item.
with

baskets as (

    select distinct
        as_of,
        user_id,
        item_id,
        occurred_at,
        decay
    from {{ ref('int_events_before_cutoffs') }}
    where event_type in ('add_to_cart', 'purchase')

),

pairs as (

    select
        anchor.as_of,
        anchor.item_id,
        partner.item_id as neighbour_item_id,
        {{ exact_sum('least(anchor.decay, partner.decay)') }} as score,
        count(distinct anchor.user_id) as users
    from baskets as anchor
    inner join baskets as partner
        on partner.as_of = anchor.as_of
        and partner.user_id = anchor.user_id
        and partner.item_id <> anchor.item_id
        and partner.occurred_at between anchor.occurred_at - interval 1 day
            and anchor.occurred_at + interval 1 day
    group by anchor.as_of, anchor.item_id, partner.item_id

),

{{ top_neighbours('pairs') }}

select * from final
