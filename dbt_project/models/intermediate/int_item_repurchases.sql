-- How each item is re-bought across users before each cutoff: how many users bought it, how many
-- of them bought it again on a later occasion, and the median gap between a user's occasions.
with

occasions as (

    select * from {{ ref('int_purchase_occasions') }}

),

final as (

    select
        as_of,
        item_id,
        count(distinct user_id) as buyers,
        count(distinct user_id) filter (where nth_occasion = 2) as rebuyers,
        median(gap_days) as repurchase_interval_days
    from occasions
    group by as_of, item_id

)

select * from final
