-- The item catalog cast to its contract types.
with source as (

    select * from {{ source('lake', 'items') }}

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
        cast(created_at as timestamptz) as created_at
    from source

)

select * from final
