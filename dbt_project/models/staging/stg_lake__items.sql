-- The item catalog cast to its contract types.
with source as (

    select * from {{ source('lake', 'items') }}

),

-- Ingestion rewrites the catalog into its current contract, but a catalog written before
-- `is_recommendable` existed (and not ingested since) lacks it: union by name adds it as null.
conformed as (

    select * from source
    union all by name
    select cast(null as boolean) as is_recommendable where false

),

final as (

    select
        cast(item_id as varchar) as item_id,
        cast(title as varchar) as title,
        cast(category_id as varchar) as category_id,
        cast(category_path as varchar) as category_path,
        cast(brand as varchar) as brand,
        cast(price as double) as price,
        cast(is_in_stock as boolean) as is_in_stock,
        cast(stock_updated_at as timestamptz) as stock_updated_at,
        -- Null: no delivery said anything, and an item is recommendable unless the shop says not.
        coalesce(cast(is_recommendable as boolean), true) as is_recommendable,
        cast(created_at as timestamptz) as created_at
    from conformed

)

select * from final
