-- What each user did with each item before each cutoff: the history behind "continue shopping"
-- and "buy again", and the repeat-purchase signals: how often and how recently the user bought
-- the item, their own re-purchase rhythm and the item's, and whether a re-purchase is due.
{%- set purchase = "event_type = 'purchase'" %}
with

events as (

    select * from {{ ref('int_events_before_cutoffs') }}

),

occasions as (

    select * from {{ ref('int_purchase_occasions') }}

),

item_repurchases as (

    select as_of, item_id, repurchase_interval_days
    from {{ ref('int_item_repurchases') }}

),

activity as (

    select
        as_of,
        user_id,
        item_id,
        count(*) filter (where event_type = 'view') as views,
        count(*) filter (where event_type = 'add_to_cart') as carts,
        count(*) filter (where {{ purchase }}) as purchases,
        {%- for half_life in [7, 30, 90] %}
        coalesce(
            {{ exact_sum(time_decay('age_days', half_life), where=purchase) }}, 0.0
        ) as purchases_decayed_{{ half_life }}d,
        {%- endfor %}
        min(age_days) as days_since_last,
        min(age_days) filter (where {{ purchase }}) as days_since_last_purchase,
        {{ exact_sum('event_weight * decay') }} as interest
    from events
    group by as_of, user_id, item_id

),

user_rhythm as (

    select
        as_of,
        user_id,
        item_id,
        count(*) as purchase_occasions,
        min(basket_number) as first_basket_number,
        -- The mean gap between consecutive occasions: (last - first) / (occasions - 1).
        {{ days_between('min(occurred_at)', 'max(occurred_at)') }}
            / nullif(count(*) - 1, 0) as own_repurchase_interval_days
    from occasions
    group by as_of, user_id, item_id

),

user_baskets as (

    select as_of, user_id, max(basket_number) as baskets
    from occasions
    group by as_of, user_id

),

joined as (

    select
        activity.*,
        coalesce(user_rhythm.purchase_occasions, 0) as purchase_occasions,
        user_rhythm.own_repurchase_interval_days,
        -- Of the baskets the user filled since first buying the item, the share holding it:
        -- 1 for a staple bought every time, small for a one-off. Null without a purchase.
        user_rhythm.purchase_occasions
            / (user_baskets.baskets - user_rhythm.first_basket_number + 1)
            as purchase_basket_share,
        item_repurchases.repurchase_interval_days as item_repurchase_interval_days
    from activity
    left join user_rhythm
        on user_rhythm.as_of = activity.as_of
        and user_rhythm.user_id = activity.user_id
        and user_rhythm.item_id = activity.item_id
    left join user_baskets
        on user_baskets.as_of = activity.as_of
        and user_baskets.user_id = activity.user_id
    left join item_repurchases
        on item_repurchases.as_of = activity.as_of
        and item_repurchases.item_id = activity.item_id

),

final as (

    select
        *,
        -- > 1: longer since the last purchase than the typical gap (the user's own when they
        -- re-bought it before, else the item's across users). Null without a purchase or a gap.
        days_since_last_purchase
            / nullif(coalesce(own_repurchase_interval_days, item_repurchase_interval_days), 0)
            as repurchase_due_ratio
    from joined

)

select * from final
