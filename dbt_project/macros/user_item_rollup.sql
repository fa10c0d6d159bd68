{#
    Rolls user_item_features up to one row per user and item attribute (category, brand): views,
    carts and purchases, recency, decayed interest and affinity (the attribute's share of the
    user's interest). Shared by user_category_features and user_brand_features.
#}
{% macro user_item_rollup(attribute) -%}
with

user_items as (

    select * from {{ ref('user_item_features') }}

),

items as (

    select item_id, {{ attribute }} from {{ ref('stg_lake__items') }}
    where {{ attribute }} is not null

),

per_attribute as (

    select
        user_items.as_of,
        user_items.user_id,
        items.{{ attribute }},
        sum(user_items.views + user_items.carts + user_items.purchases) as events,
        sum(user_items.purchases) as purchases,
        min(user_items.days_since_last) as days_since_last,
        {{ exact_sum('user_items.interest') }} as interest
    from user_items
    inner join items
        on items.item_id = user_items.item_id
    group by user_items.as_of, user_items.user_id, items.{{ attribute }}

),

final as (

    select
        *,
        interest / nullif({{ exact_sum('interest', over='partition by as_of, user_id') }}, 0)
            as affinity
    from per_attribute

)

select * from final
{%- endmacro %}
