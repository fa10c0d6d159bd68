-- Graded labels of each cutoff: the strongest thing each user did with each item in the window
-- after the cutoff, [as_of, label_until). Purchase 3 > add_to_cart 2 > view 1.
with

events as (

    select * from {{ ref('stg_lake__events') }}

),

cutoffs as (

    select * from {{ ref('int_cutoffs') }} where label_until is not null

),

final as (

    select
        cutoffs.as_of,
        events.user_id,
        events.item_id,
        max({{ label_grade('events.event_type') }}) as label
    from events
    inner join cutoffs
        on events.occurred_at >= cutoffs.as_of
        and events.occurred_at < cutoffs.label_until
    group by cutoffs.as_of, events.user_id, events.item_id
    having max({{ label_grade('events.event_type') }}) > 0

)

select * from final
