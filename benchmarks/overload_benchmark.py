"""Overload benchmark of the recommendation service (issue 14, item 3): load shedding at 256
connections.

`bentoml serve bentos/service.py:RecommendationService` (one worker, from the project root) serves
a copy of a demo-sized state per configuration; a closed-loop client keeps `--connections`
keep-alive connections busy posting `{"user_id": …, "k": 10}` to `/recommend` (user ids cycling
through 2,000: 90% with candidates, 10% never seen) and resends on each answer at once, a 429
included (`Retry-After` ignored: the worst case, like `wrk`). Meanwhile one more connection probes
`/readyz` and `/livez` every 50 ms. Each configuration is measured `--repeats` times (after a
warm-up); the table shows the medians:

- admitted req/s (answers 200) and the p50/p95/p99/max latency of admitted requests,
- the share shed (429),
- the `/readyz` and `/livez` latency under that load (p50 and max).

Configurations: `SHELFWISE_MAX_CONCURRENCY` = each of `--limits` (0: no limit, today's behaviour
before issue 14), and BentoML's own `traffic.max_concurrency` (`--bentoml-limit`, with ours off),
which never sheds an inline async endpoint (see `bentos/overload.py`).

The client is this script's own (uvloop, raw HTTP/1.1 over `asyncio.Protocol`), not `wrk`: `wrk`
records one latency histogram for every answer, and the admitted requests' latency is what the
target is about. It costs a few tens of microseconds per answer, far less than the server, and runs
on the same 2-core machine (noisy: compare configurations of one run; medians of short runs).

State: the feedback-loop benchmark's demo shop (`--users 5000 --items 2000 --events 500000`,
trained once), built into `--state` by that benchmark's code and reused when it exists.

Target (issue 14): p99 of admitted requests under 100 ms at 256 connections, health within 50 ms.

Usage:
    .venv/bin/python benchmarks/overload_benchmark.py [--state DIR] [--limits 0 8 16 32 64]
        [--connections 256] [--duration S] [--warmup S] [--repeats N] [--bentoml-limit N]

Prints a table and writes JSON to `benchmarks/results/overload_benchmark.json`.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from feedback_loop_benchmark import BUILD_RECORD, build_state, serving, state_copy
from harness import format_table, machine, versions
from serving_benchmark import benchmark_user_ids

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "overload_benchmark.json"
DEFAULT_STATE = Path(tempfile.gettempdir()) / "shelfwise-overload-benchmark"
SERVICE = "bentos/service.py:RecommendationService"
TARGET_P99_MS = 100.0  # admitted requests, at 256 connections
TARGET_HEALTH_MS = 50.0  # /readyz and /livez under that load
PROBE_INTERVAL_S = 0.05


# --- the client --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one run's connections saw inside the measured window."""

    start: float = 0.0
    end: float = float("inf")
    latencies_s: dict[int, list[float]] = field(default_factory=dict)
    probes_s: dict[str, list[float]] = field(default_factory=dict)
    closed: int = 0  # connections the server closed (a client error otherwise not seen)

    def record(self, key: int | str, started: float, now: float) -> None:
        if self.start <= started and now <= self.end:
            table = self.probes_s if isinstance(key, str) else self.latencies_s
            table.setdefault(key, []).append(now - started)


class Connection(asyncio.Protocol):
    """One keep-alive connection sending `requests` in turn, each as soon as the last is answered
    (after `pause_s`); records every answer's status (or `label`) and latency in `tally`."""

    def __init__(
        self, requests: list[bytes], tally: Tally, pause_s: float = 0.0, label: str = ""
    ) -> None:
        self.requests, self.tally, self.pause_s, self.label = requests, tally, pause_s, label
        self.next, self.buffer, self.started = 0, b"", 0.0
        self.stopping = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if self.stopping or self.transport is None or self.transport.is_closing():
            return
        request = self.requests[self.next % len(self.requests)]
        self.next += 1
        self.started = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        length_at = head.find(b"content-length:")
        length = int(head[length_at + 15 :].split(b"\r\n", 1)[0]) if length_at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        self.buffer = self.buffer[end + 4 + length :]
        self.tally.record(f"{self.label} {status}" if self.label else status, self.started, now)
        if self.pause_s:
            asyncio.get_running_loop().call_later(self.pause_s, self.send)
        else:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopping:
            self.tally.closed += 1


def post(path: str, body: dict[str, Any]) -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode() + raw


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def drive(
    port: int, requests: list[bytes], connections: int, warmup_s: float, seconds: float
) -> Tally:
    """Runs the load and the probes; returns what was answered inside the measured window."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    opened: list[Connection] = []
    for number in range(connections):
        # Each connection starts at another place in the bodies.
        shifted = requests[number % len(requests) :] + requests[: number % len(requests)]
        _, protocol = await loop.create_connection(
            lambda shifted=shifted: Connection(shifted, tally), "127.0.0.1", port
        )
        opened.append(protocol)
    for path in ("/readyz", "/livez"):
        _, probe = await loop.create_connection(
            lambda path=path: Connection([get(path)], tally, PROBE_INTERVAL_S, path),
            "127.0.0.1",
            port,
        )
        opened.append(probe)
    await asyncio.sleep(warmup_s)
    tally.start = time.perf_counter()
    tally.end = tally.start + seconds
    await asyncio.sleep(seconds)
    for connection in opened:
        connection.stopping = True
        if connection.transport is not None:
            connection.transport.close()
    return tally


def _percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of seconds, in milliseconds (0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


def figures_of(tally: Tally, seconds: float) -> dict[str, float]:
    """Admitted throughput and latency, shed share and probe latency of one run."""
    admitted = tally.latencies_s.get(200, [])
    answers = sum(len(values) for values in tally.latencies_s.values())
    shed = len(tally.latencies_s.get(429, []))
    readyz, livez = (
        [v for key, values in tally.probes_s.items() if key.startswith(path) for v in values]
        for path in ("/readyz", "/livez")
    )
    return {
        "admitted_rps": len(admitted) / seconds,
        "answered_rps": answers / seconds,
        "p50_ms": _percentile(admitted, 0.50),
        "p95_ms": _percentile(admitted, 0.95),
        "p99_ms": _percentile(admitted, 0.99),
        "max_ms": _percentile(admitted, 1.0),
        "shed_share": shed / answers if answers else 0.0,
        "other_statuses": answers - len(admitted) - shed,
        "readyz_p50_ms": _percentile(readyz, 0.50),
        "readyz_max_ms": _percentile(readyz, 1.0),
        "livez_p50_ms": _percentile(livez, 0.50),
        "livez_max_ms": _percentile(livez, 1.0),
        "probes_not_200": sum(
            len(values) for key, values in tally.probes_s.items() if not key.endswith(" 200")
        ),
        "closed_connections": tally.closed,
    }


def median_figures(runs: list[dict[str, float]]) -> dict[str, Any]:
    figures: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    figures["p99_ms_runs"] = [round(run["p99_ms"], 1) for run in runs]
    return figures


# --- the benchmark -----------------------------------------------------------------------------


def configurations(args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    """(name, server environment) of every configuration measured."""
    found = [
        (f"ours, limit {limit}" if limit else "no limit", {"SHELFWISE_MAX_CONCURRENCY": str(limit)})
        for limit in args.limits
    ]
    if args.bentoml_limit:
        found.append(
            (
                f"BentoML max_concurrency {args.bentoml_limit}",
                {
                    "SHELFWISE_MAX_CONCURRENCY": "0",
                    "BENTOML_CONFIG_OPTIONS": "services.shelfwise.traffic.max_concurrency="
                    f"{args.bentoml_limit}",
                },
            )
        )
    return found


def ensure_state(home: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The state's build record, building it first when it does not exist."""
    record = home / BUILD_RECORD
    if record.exists():
        return json.loads(record.read_text())
    if home.exists() and any(home.iterdir()):
        raise SystemExit(f"{home} exists but was not built by the feedback-loop benchmark's code")
    return build_state(home, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="state folder")
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=35)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--limits", type=int, nargs="+", default=[0, 8, 16, 32, 64])
    parser.add_argument("--bentoml-limit", type=int, default=32, help="0: leave it out")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--user-ids", type=int, default=2_000)
    parser.add_argument("--unknown-share", type=float, default=0.1)
    parser.add_argument("--port", type=int, default=3730)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    home = args.state.resolve()
    build = ensure_state(home, args)
    user_ids = benchmark_user_ids(home / "lake", args.user_ids, args.unknown_share, args.seed)
    requests = [post("/recommend", {"user_id": user, "k": 10}) for user in user_ids]
    scratch = Path(tempfile.mkdtemp(prefix="overload-benchmark-"))
    results: dict[str, Any] = {}
    began = time.perf_counter()
    for name, env in configurations(args):
        print(f"{name}: serving …", flush=True)
        with (
            state_copy(home, scratch, "state") as copy,
            serving(copy, args.port, scratch / "bentoml.log", env) as (_, _, _),
        ):
            runs = []
            for _ in range(args.repeats):
                tally = uvloop.run(
                    drive(args.port, requests, args.connections, args.warmup, args.duration)
                )
                runs.append(figures_of(tally, args.duration))
                print(
                    f"  admitted {runs[-1]['admitted_rps']:.0f} req/s, p99 "
                    f"{runs[-1]['p99_ms']:.1f} ms, shed {runs[-1]['shed_share']:.0%}, /readyz max "
                    f"{runs[-1]['readyz_max_ms']:.1f} ms",
                    flush=True,
                )
        results[name] = {"env": env, "runs": runs, "median": median_figures(runs)}
    elapsed = time.perf_counter() - began

    header = [
        "configuration",
        "admitted/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "shed",
        "/readyz p50",
        "/readyz max",
        "/livez max",
    ]
    rows = [header]
    for name, result in results.items():
        m = result["median"]
        rows.append(
            [
                name,
                f"{m['admitted_rps']:,.0f}",
                f"{m['p50_ms']:.1f}",
                f"{m['p95_ms']:.1f}",
                f"{m['p99_ms']:.1f}",
                f"{m['max_ms']:.0f}",
                f"{m['shed_share']:.0%}",
                f"{m['readyz_p50_ms']:.1f}",
                f"{m['readyz_max_ms']:.1f}",
                f"{m['livez_max_ms']:.1f}",
            ]
        )
    print(
        f"\n/recommend at {args.connections} connections (closed loop, 429s resent at once); "
        f"medians of {args.repeats} runs of {args.duration:g} s\n"
    )
    print(format_table(rows))

    report = {
        "benchmark": "overload",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions("bentoml", "uvicorn", "uvloop", "lightgbm"),
        "config": {
            "state": str(home),
            "build": build,
            "service": SERVICE,
            "workers": 1,
            "client": "closed loop, uvloop + raw HTTP/1.1 keep-alive, 429s resent at once",
            "connections": args.connections,
            "probe_interval_s": PROBE_INTERVAL_S,
            "duration_seconds": args.duration,
            "warmup_seconds": args.warmup,
            "repeats": args.repeats,
            "user_ids": args.user_ids,
            "unknown_share": args.unknown_share,
            "elapsed_seconds": round(elapsed, 1),
        },
        "targets": {"admitted_p99_ms": TARGET_P99_MS, "health_ms": TARGET_HEALTH_MS},
        "figures": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
