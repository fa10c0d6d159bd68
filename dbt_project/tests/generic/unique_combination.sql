{#
    The grain test: no two rows share the same values in `columns`. Grouping on the native
    columns is much cheaper than `unique` on a concatenated string at millions of rows.
#}
{% test unique_combination(model, columns) %}

select {{ columns | join(', ') }}, count(*) as rows_sharing_key
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1

{% endtest %}
