-- The feature cutoffs ("as of" timestamps) of this build, from the dbt var `as_of` (one timestamp
-- or a list). Without it, one cutoff at the midnight after the last event: features "as of now".
-- label_until is the next cutoff: the labels of a cutoff come from [as_of, label_until).
-- The dependency on the events holds with or without the var (dbt and Dagster see one graph):
-- depends_on: {{ ref('stg_lake__events') }}
{%- set as_of = var('as_of') -%}
{%- if as_of is string -%}{%- set as_of = [as_of] -%}{%- endif %}

with

{% if as_of | length > 0 -%}
listed as (

    {% for cutoff in as_of -%}
    select cast('{{ cutoff }}' as timestamptz) as as_of
    {% if not loop.last %}union all{% endif %}
    {% endfor %}

),
{%- else -%}
listed as (

    select date_trunc('day', max(occurred_at)) + interval 1 day as as_of
    from {{ ref('stg_lake__events') }}

),
{%- endif %}

distinct_cutoffs as (

    select distinct as_of from listed

),

final as (

    select
        as_of,
        lead(as_of) over (order by as_of) as label_until
    from distinct_cutoffs

)

select * from final
