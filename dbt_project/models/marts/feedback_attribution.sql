-- What the shown recommendations led to: impressions joined to the interactions that came from
-- them (events carrying the response's rec_id, on an item the response showed), per day, model
-- version, strategy, experiment and arm.
with

impressions as (

    select * from {{ ref('stg_lake__impressions') }}

),

outcomes as (

    select * from {{ ref('int_recommendation_outcomes') }}

),

attributed as (

    select
        cast(impressions.shown_at as date) as shown_on,
        coalesce(impressions.model_version, 'none') as model_version,
        impressions.strategy,
        coalesce(impressions.experiment, 'none') as experiment,
        coalesce(impressions.arm, 'none') as arm,
        impressions.rec_id,
        coalesce(outcomes.is_clicked, false) as is_clicked,
        coalesce(outcomes.is_carted, false) as is_carted,
        coalesce(outcomes.is_purchased, false) as is_purchased
    from impressions
    left join outcomes
        on outcomes.rec_id = impressions.rec_id
        and outcomes.item_id = impressions.item_id

),

final as (

    select
        shown_on,
        model_version,
        strategy,
        experiment,
        arm,
        count(*) as impressions,
        count(distinct rec_id) as responses,
        count(*) filter (where is_clicked) as clicks,
        count(*) filter (where is_carted) as carts,
        count(*) filter (where is_purchased) as purchases,
        count(*) filter (where is_clicked) / count(*) as ctr,
        count(*) filter (where is_purchased) / count(*) as conversion_rate
    from attributed
    group by shown_on, model_version, strategy, experiment, arm

)

select * from final
