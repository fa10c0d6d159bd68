-- What each recommended item led to: the events that carried a response's rec_id, per response
-- and item. A purchase's revenue is its price times its quantity; an event without a price takes
-- the catalog's (the shop may post purchases without one).
with

events as (

    select * from {{ ref('stg_lake__events') }}
    where rec_id is not null

),

items as (

    select item_id, price from {{ ref('stg_lake__items') }}

),

priced as (

    select
        events.rec_id,
        events.item_id,
        events.event_type,
        events.quantity * coalesce(events.price, items.price, 0) as amount
    from events
    left join items on items.item_id = events.item_id

),

final as (

    select
        rec_id,
        item_id,
        bool_or(event_type = 'view') as is_clicked,
        bool_or(event_type = 'add_to_cart') as is_carted,
        bool_or(event_type = 'purchase') as is_purchased,
        -- Money: summed exactly (6 decimals), so a rebuild gives the same revenue to the cent.
        coalesce({{ exact_sum('amount', scale=6, where="event_type = 'purchase'") }}, 0) as revenue
    from priced
    group by rec_id, item_id

)

select * from final
