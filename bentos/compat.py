"""BentoML set-up shared by the service and the benchmark's no-op service.

Filled in by the latency-tail work (see ARCHITECTURE.md §7); the service applies `SERVICE_CONFIG`
in its `@bentoml.service` decorator and calls `settle_heap()` at the end of `__init__`.
"""

import gc

SERVICE_CONFIG: dict = {"traffic": {"timeout": 10}}


def settle_heap() -> None:
    """Collects once and freezes what start-up allocated, so later collections skip it."""
    gc.collect()
    gc.freeze()
