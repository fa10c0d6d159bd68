{#
    A float sum that does not depend on the order rows are added in. DuckDB sums doubles in
    parallel, so the same rows summed twice can differ in the last bits and exact ties in a rank
    (popularity, co-visitation neighbours) can swap between runs. Each term is rounded to `scale`
    decimals (a decimal(18, scale): terms up to 10^(18 - scale)) and summed exactly; measured as
    fast as the float sum. `where` and `over` add a filter clause or make it a window sum.
#}
{% macro exact_sum(expression, scale=9, where=none, over=none) -%}
    cast(
        sum(cast({{ expression }} as decimal(18, {{ scale }})))
        {%- if where %} filter (where {{ where }}){% endif %}
        {%- if over %} over ({{ over }}){% endif %}
        as double
    )
{%- endmacro %}
