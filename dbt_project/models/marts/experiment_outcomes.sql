-- Every item shown in an experiment and what it led to: the impressions of responses that
-- belonged to an experiment, joined to the events that carried the response's rec_id on the
-- shown item. The `experiment_results` asset sums these per user and arm.
with

impressions as (

    select * from {{ ref('stg_lake__impressions') }}
    where experiment is not null

),

outcomes as (

    select * from {{ ref('int_recommendation_outcomes') }}

),

final as (

    select
        impressions.experiment,
        -- 'interleaved' for a list merged from two arms (drafted_by names the arm of the item).
        coalesce(impressions.arm, 'none') as arm,
        impressions.drafted_by,
        impressions.user_id,
        impressions.rec_id,
        impressions.item_id,
        impressions.position,
        impressions.shown_at,
        impressions.model_version,
        impressions.strategy,
        coalesce(outcomes.is_clicked, false) as is_clicked,
        coalesce(outcomes.is_carted, false) as is_carted,
        coalesce(outcomes.is_purchased, false) as is_purchased,
        coalesce(outcomes.revenue, 0) as revenue
    from impressions
    left join outcomes
        on outcomes.rec_id = impressions.rec_id
        and outcomes.item_id = impressions.item_id

)

select * from final
