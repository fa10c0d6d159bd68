{#
    The last CTEs of an item-to-item mart: rank each item's neighbours in the `pairs` CTE by score
    (ties by neighbour id) and keep the top `covisitation_neighbours` per item and cutoff.
#}
{% macro top_neighbours(pairs='pairs') -%}
ranked as (

    select
        *,
        row_number() over (
            partition by as_of, item_id order by score desc, neighbour_item_id
        ) as neighbour_rank
    from {{ pairs }}

),

final as (

    select * from ranked where neighbour_rank <= {{ var('covisitation_neighbours') }}

)
{%- endmacro %}
