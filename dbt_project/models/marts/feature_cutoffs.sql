-- The cutoffs of this build, exported so that Python reads the same list dbt computed with.
with

cutoffs as (

    select * from {{ ref('int_cutoffs') }}

),

final as (

    select as_of, label_until from cutoffs

)

select * from final
