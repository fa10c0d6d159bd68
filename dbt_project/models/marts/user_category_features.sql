-- Each user's affinity to each category before each cutoff: the share of their decayed interest.
-- Rolled up from user_item_features (one row per user and item), much smaller than the events.
{{ user_item_rollup('category_id') }}
