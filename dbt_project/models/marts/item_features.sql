-- Item features as of each cutoff: catalog attributes plus popularity, trend and funnel rates
-- from the events before the cutoff, and how often and how soon its buyers re-buy it. Items created after a cutoff do not exist as of it. Items
-- that are not recommendable are here with all their activity (they are real purchases); the
-- generators and serving never propose them.
with

items as (

    select * from {{ ref('stg_lake__items') }}

),

cutoffs as (

    select as_of from {{ ref('int_cutoffs') }}

),

events as (

    select * from {{ ref('int_events_before_cutoffs') }}

),

repurchases as (

    select * from {{ ref('int_item_repurchases') }}

),

item_activity as (

    select
        as_of,
        item_id,
        count(*) filter (where event_type = 'view' and age_days < 1) as views_1d,
        count(*) filter (where event_type = 'view' and age_days < 7) as views_7d,
        count(*) filter (where event_type = 'view' and age_days < 30) as views_30d,
        count(*) filter (where event_type = 'add_to_cart' and age_days < 30) as carts_30d,
        count(*) filter (where event_type = 'purchase' and age_days < 7) as purchases_7d,
        count(*) filter (where event_type = 'purchase' and age_days < 30) as purchases_30d,
        count(distinct user_id) filter (where age_days < 30) as users_30d,
        {{ exact_sum('event_weight * decay') }} as popularity
    from events
    group by as_of, item_id

),

joined as (

    select
        cutoffs.as_of,
        items.item_id,
        items.category_id,
        items.brand,
        items.price,
        items.is_in_stock,
        items.stock_updated_at,
        items.is_recommendable,
        {{ days_between('items.created_at', 'cutoffs.as_of') }} as age_days,
        coalesce(item_activity.views_1d, 0) as views_1d,
        coalesce(item_activity.views_7d, 0) as views_7d,
        coalesce(item_activity.views_30d, 0) as views_30d,
        coalesce(item_activity.carts_30d, 0) as carts_30d,
        coalesce(item_activity.purchases_7d, 0) as purchases_7d,
        coalesce(item_activity.purchases_30d, 0) as purchases_30d,
        coalesce(item_activity.users_30d, 0) as users_30d,
        coalesce(item_activity.popularity, 0.0) as popularity,
        coalesce(repurchases.buyers, 0) as buyers,
        -- The share of the item's buyers who bought it again on a later occasion.
        repurchases.rebuyers / nullif(repurchases.buyers, 0) as rebuyer_share,
        repurchases.repurchase_interval_days
    from cutoffs
    cross join items
    left join item_activity
        on item_activity.as_of = cutoffs.as_of
        and item_activity.item_id = items.item_id
    left join repurchases
        on repurchases.as_of = cutoffs.as_of
        and repurchases.item_id = items.item_id
    where items.created_at is null or items.created_at < cutoffs.as_of

),

final as (

    select
        *,
        -- Short window against long window, per day, smoothed: > 1 means rising.
        (views_7d / 7.0 + 1.0) / (views_30d / 30.0 + 1.0) as trend,
        -- Funnel rates with additive smoothing so that rare items are not 0 or 1.
        (carts_30d + 1.0) / (views_30d + 20.0) as view_to_cart_rate,
        (purchases_30d + 1.0) / (carts_30d + 3.0) as cart_to_purchase_rate,
        -- Items that are never recommended (fees, postage) rank after every item that may be, so
        -- `popularity_rank <= n` is the n most popular items a shopper may be shown.
        row_number() over (
            partition by as_of order by is_recommendable desc, popularity desc, item_id
        ) as popularity_rank
    from joined

)

select * from final
