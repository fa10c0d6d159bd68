-- Every pair of items a user carted or bought within a day of each other, once per pair of events
-- (not once per cutoff): a feature as of a cutoff sees the pairs whose later event precedes it
-- (`last_at < as_of`), so a pair exists before a cutoff exactly when both its events do. Ordered
-- pairs: (a, b) and (b, a) are both here, as each item is the anchor of its own neighbours. A
-- table in the warehouse, computed once for `item_bought_together`.
{{ config(materialized='table') }}
with

events as (

    select distinct
        user_id,
        item_id,
        occurred_at,
        cast(floor(epoch(occurred_at) / 86400) as bigint) as epoch_day
    from {{ ref('stg_lake__events') }}
    where event_type in ('add_to_cart', 'purchase')

),

-- A partner within a day lies on the anchor's own day or the day before or after: an equi-join
-- on (user, day) instead of a range join over all of a user's events (a year of a household's
-- shopping is ~600 lines, 360,000 candidate pairs per household to filter).
anchors as (

    select
        *,
        unnest([epoch_day - 1, epoch_day, epoch_day + 1]) as partner_day
    from events

),

pairs as (

    select
        anchor.user_id,
        anchor.item_id,
        partner.item_id as neighbour_item_id,
        least(anchor.occurred_at, partner.occurred_at) as first_at,
        greatest(anchor.occurred_at, partner.occurred_at) as last_at
    from anchors as anchor
    inner join events as partner
        on partner.user_id = anchor.user_id
        and partner.epoch_day = anchor.partner_day
        and partner.item_id <> anchor.item_id
        and partner.occurred_at between anchor.occurred_at - interval 1 day
            and anchor.occurred_at + interval 1 day

),

final as (

    select
        *,
        -- The user's earliest pair of these two items: as of a cutoff, the user counts among the
        -- pair's users exactly when this one precedes it (no count distinct per cutoff).
        row_number() over (
            partition by user_id, item_id, neighbour_item_id order by last_at, first_at
        ) = 1 as is_users_first
    from pairs

)

select * from final
