-- How often the service degraded: per day and endpoint, the responses at each fallback level
-- and their share of the day's responses (one response = one rec_id of the impressions). A
-- response that showed nothing logs no impression and is not counted; impressions logged before
-- they carried the level are left out.
with

impressions as (

    select * from {{ ref('stg_lake__impressions') }}

),

responses as (

    select
        rec_id,
        cast(min(shown_at) as date) as shown_on,
        -- strategy is "<endpoint>:<cold-start rung>"
        split_part(min(strategy), ':', 1) as endpoint,
        cast(min(fallback_level) as integer) as fallback_level
    from impressions
    where fallback_level is not null
    group by rec_id

),

daily as (

    select
        shown_on,
        endpoint,
        fallback_level,
        count(*) as responses
    from responses
    group by shown_on, endpoint, fallback_level

),

final as (

    select
        shown_on,
        endpoint,
        fallback_level,
        responses,
        responses / sum(responses) over (partition by shown_on, endpoint) as response_share
    from daily

)

select * from final
