"""What the benchmark scripts share, so that each reads as its measurement:

- `state`: the project's paths, the Makefile's environment for a state folder, the commands that
  fill one, its build record and throw-away copies;
- `processes`: process trees from /proc (memory sampled in a thread, CPU), commands run with
  their output in a log, child processes answering with a line of JSON;
- `servers`: `bentoml serve` until ready, stopped with its whole process tree;
- `wrk`: wrk runs reported as JSON, the `/recommend` load;
- `report`: medians and percentiles, printed tables, the result JSON (machine, versions).

The scripts run as `.venv/bin/python benchmarks/<name>.py`, so this package is imported by name
from their folder. It imports the standard library only (third-party modules inside the functions
that need them), so that a script run in another interpreter can use it.
"""

from .processes import (
    Background,
    ChildFailed,
    CpuMeter,
    Measured,
    TreeMemory,
    child_json,
    cpu_ticks,
    load_average,
    memory_kib,
    mib,
    print_result,
    process_tree,
    run_logged,
    wait_for_quiet,
)
from .report import (
    format_pairs,
    format_table,
    machine,
    median_figures,
    now,
    percentile_ms,
    report_head,
    versions,
    write_json,
)
from .servers import Server, exit_on_sigterm, serve, stop
from .state import (
    BIN,
    RESULTS_DIR,
    ROOT,
    generate,
    materialize,
    shelfwise,
    shop_arguments,
    shop_config,
    state_copy,
    state_env,
    state_record,
)
from .wrk import (
    LATENCIES_MS,
    benchmark_user_ids,
    recommend_lua,
    report_lua,
    wrk_command,
    wrk_json,
)

__all__ = [
    "Background",
    "BIN",
    "LATENCIES_MS",
    "RESULTS_DIR",
    "ROOT",
    "ChildFailed",
    "CpuMeter",
    "Measured",
    "Server",
    "TreeMemory",
    "benchmark_user_ids",
    "child_json",
    "cpu_ticks",
    "exit_on_sigterm",
    "format_pairs",
    "format_table",
    "generate",
    "load_average",
    "machine",
    "materialize",
    "median_figures",
    "memory_kib",
    "mib",
    "now",
    "percentile_ms",
    "print_result",
    "process_tree",
    "recommend_lua",
    "report_head",
    "report_lua",
    "run_logged",
    "serve",
    "shelfwise",
    "shop_arguments",
    "shop_config",
    "state_copy",
    "state_env",
    "state_record",
    "stop",
    "versions",
    "wait_for_quiet",
    "wrk_command",
    "wrk_json",
    "write_json",
]
