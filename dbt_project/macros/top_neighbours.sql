{#
    The last CTEs of an item-to-item mart: rank each item's neighbours in the `pairs` CTE by score
    (ties by neighbour id) and keep the top `covisitation_neighbours` per item and cutoff. Items
    that are never recommended (fees, postage) are no one's neighbour, so they take no slot; as
    anchors they keep their neighbours.
#}
{% macro top_neighbours(pairs='pairs') -%}
not_recommendable as (

    select item_id from {{ ref('stg_lake__items') }} where not is_recommendable

),

ranked as (

    select
        {{ pairs }}.*,
        row_number() over (
            partition by {{ pairs }}.as_of, {{ pairs }}.item_id
            order by {{ pairs }}.score desc, {{ pairs }}.neighbour_item_id
        ) as neighbour_rank
    from {{ pairs }}
    anti join not_recommendable
        on not_recommendable.item_id = {{ pairs }}.neighbour_item_id

),

final as (

    select * from ranked where neighbour_rank <= {{ var('covisitation_neighbours') }}

)
{%- endmacro %}
