{# The weight of an event type in popularity and co-visitation scores (var `event_weights`). #}
{% macro event_weight(event_type_column) -%}
    case {{ event_type_column }}
    {%- for event_type, weight in var('event_weights').items() %}
        when '{{ event_type }}' then {{ weight }}
    {%- endfor %}
        else 0.0
    end
{%- endmacro %}

{# Exponential time decay with the half-life of var `decay_half_life_days`, or of `half_life_days`. #}
{% macro time_decay(age_days_column, half_life_days=none) -%}
    exp(-ln(2) * {{ age_days_column }} / {{ half_life_days or var('decay_half_life_days') }})
{%- endmacro %}

{# Days between two timestamps as a double. #}
{% macro days_between(earlier, later) -%}
    ((epoch({{ later }}) - epoch({{ earlier }})) / 86400.0)
{%- endmacro %}

{# Graded relevance of an event type: purchase 3 > add_to_cart 2 > view 1 > anything else 0. #}
{% macro label_grade(event_type_column) -%}
    case {{ event_type_column }}
        when 'purchase' then 3
        when 'add_to_cart' then 2
        when 'view' then 1
        else 0
    end
{%- endmacro %}
