-- Every event paired with every cutoff it precedes: the only events a feature as of that cutoff
-- may see. Carries the event's age at the cutoff, its weight and its time decay. A table in the
-- warehouse, computed once for all marts.
{{ config(materialized='table') }}
with

events as (

    select * from {{ ref('stg_lake__events') }}

),

cutoffs as (

    select as_of from {{ ref('int_cutoffs') }}

),

paired as (

    select
        cutoffs.as_of,
        events.*,
        {{ days_between('events.occurred_at', 'cutoffs.as_of') }} as age_days
    from events
    inner join cutoffs
        on events.occurred_at < cutoffs.as_of

),

final as (

    select
        *,
        {{ event_weight('event_type') }} as event_weight,
        {{ time_decay('age_days') }} as decay
    from paired

)

select * from final
