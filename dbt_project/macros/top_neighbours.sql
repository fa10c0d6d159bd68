{#
    The last CTEs of an item-to-item mart: rank each item's neighbours in the `pairs` CTE by score
    (ties by neighbour id) and keep the top `covisitation_neighbours` per item and cutoff. Items
    that are never recommended (fees, postage) are no one's neighbour, so they take no slot; as
    anchors they keep their neighbours.

    `prune`: first find each item's N-th best score (a top-N aggregate, no sort) and rank only
    the neighbours scoring at least that: the same rows, but the sort sees about N per item
    instead of every pair (on The Complete Journey's year 17M of 125M rows). Worth it when the
    pairs are many per item; `pairs` is then read twice (DuckDB materializes it).
#}
{% macro top_neighbours(pairs='pairs', prune=false) -%}
{%- set neighbours = var('covisitation_neighbours') -%}
not_recommendable as (

    select item_id from {{ ref('stg_lake__items') }} where not is_recommendable

),

recommendable_pairs as (

    select {{ pairs }}.*
    from {{ pairs }}
    anti join not_recommendable
        on not_recommendable.item_id = {{ pairs }}.neighbour_item_id

),

{% if prune -%}
thresholds as (

    -- The N-th best score (the lowest of the N best; all of them with fewer neighbours).
    select as_of, item_id, list_min(max(score, {{ neighbours }})) as min_score
    from recommendable_pairs
    group by as_of, item_id

),

candidates as (

    select recommendable_pairs.*
    from recommendable_pairs
    inner join thresholds
        on thresholds.as_of = recommendable_pairs.as_of
        and thresholds.item_id = recommendable_pairs.item_id
    where recommendable_pairs.score >= thresholds.min_score

),
{%- else -%}
candidates as (

    select * from recommendable_pairs

),
{%- endif %}

ranked as (

    select
        *,
        row_number() over (
            partition by as_of, item_id
            order by score desc, neighbour_item_id
        ) as neighbour_rank
    from candidates

),

final as (

    select * from ranked where neighbour_rank <= {{ neighbours }}

)
{%- endmacro %}
