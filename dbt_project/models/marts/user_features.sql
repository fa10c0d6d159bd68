-- User features as of each cutoff, from the user's events before it. Users with no event before
-- a cutoff have no row for it (the ranker sees missing values: a cold user).
{%- set shopping = "event_type in ('view', 'add_to_cart', 'purchase')" %}
with

events as (

    select * from {{ ref('int_events_before_cutoffs') }}

),

occasions as (

    select * from {{ ref('int_purchase_occasions') }}

),

repeats as (

    -- The share of the user's purchase occasions that re-bought an item they had bought before.
    select
        as_of,
        user_id,
        count(*) filter (where nth_occasion > 1) / count(*) as repeat_purchase_share
    from occasions
    group by as_of, user_id

),

activity as (

    select
        as_of,
        user_id,
        count(*) as events,
        count(*) filter (where event_type = 'view') as views,
        count(*) filter (where event_type = 'add_to_cart') as carts,
        count(*) filter (where event_type = 'purchase') as purchases,
        coalesce({{ exact_sum('price * quantity', 6, where="event_type = 'purchase'") }}, 0.0)
            as spend,
        count(*) filter (where age_days < 1) as events_1d,
        count(*) filter (where age_days < 7) as events_7d,
        count(*) filter (where age_days < 30) as events_30d,
        count(distinct session_id) as sessions,
        count(distinct session_id) filter (where event_type = 'purchase')
            / count(distinct session_id) as session_conversion_rate,
        min(age_days) as days_since_last_event,
        {{ exact_sum('price', 6, where=shopping) }}
            / nullif(count(price) filter (where {{ shopping }}), 0) as mean_price
    from events
    group by as_of, user_id

),

final as (

    select
        activity.*,
        repeats.repeat_purchase_share
    from activity
    left join repeats
        on repeats.as_of = activity.as_of
        and repeats.user_id = activity.user_id

)

select * from final
