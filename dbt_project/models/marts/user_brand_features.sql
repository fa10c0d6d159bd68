-- Each user's affinity to each brand before each cutoff: counts, recency and share of interest.
-- Rolled up from user_item_features (one row per user and item), much smaller than the events.
{{ user_item_rollup('brand') }}
