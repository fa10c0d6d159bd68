"""How the steps of one run share the machine: at most one memory-heavy step at a time.

On the 10M-event shop, `evaluation` (about 18 GB) ran beside `serving_features` (about 9 GB) and
the kernel killed it on a 23 GB machine; alone, each fits (docs/pipeline.md). Steps tagged
`MEMORY_HEAVY` therefore wait for one another, while the others still run two at a time (the
multiprocess executor's default, one per core). The cost is the overlap given up: on that shop
`evaluation` waited 4.3 minutes for `serving_features` in a 47-minute run (docs/pipeline.md).
"""

import dagster as dg

MEMORY_TAG = "shelfwise/memory"
# The op tags of an asset whose step holds many gigabytes at the 10M-event scale.
MEMORY_HEAVY = {MEMORY_TAG: "heavy"}

pipeline_executor = dg.multiprocess_executor.configured(
    {"tag_concurrency_limits": [{"key": MEMORY_TAG, "value": "heavy", "limit": 1}]},
    name="pipeline_executor",
)
