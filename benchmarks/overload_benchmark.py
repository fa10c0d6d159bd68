"""Overload benchmark of the recommendation service (issue 14, item 3): load shedding at 256
connections.

`bentoml serve bentos/service.py:RecommendationService` (one worker, from the project root) serves
a copy of a demo-sized state per configuration. 256 keep-alive connections post
`{"user_id": …, "k": 10}` to `/recommend` in a closed loop (user ids cycling through 2,000: 90%
with candidates, 10% never seen):

- `wrk` (one thread, C, light on this 2-core machine) drives 240 of them;
- this script drives the other 16 (uvloop, raw HTTP/1.1) and records each answer's status and
  latency: the latency of admitted requests (200) comes from them (`wrk` keeps one histogram for
  every answer, 429s included), a sample of the same traffic;
- the admitted and shed counts come from the server's own counters (`/metrics`, never shed):
  `bentoml_service_request_total{endpoint="/recommend",http_response_code="200"}` and
  `shelfwise_shed_requests_total`, read at the start and end of each window;
- a health probe every 50 ms, alternately `/readyz` and `/livez`, each on a new connection, as a
  kubelet probes (uvloop accepts one connection per event-loop round, so this includes waiting to
  be accepted).

Two client behaviours per server: 429s resent at once (`Retry-After` ignored: a hostile or careless
client, the worst case) and 429s resent after their `Retry-After` (`wrk`'s Lua `delay()` holds the
next request it sends for that long). Each is measured in `--repeats` windows after a warm-up that
waits until the server has accepted every connection; the table shows the medians.

Configurations: `SHELFWISE_MAX_CONCURRENCY` = each of `--limits` (0: no limit, the behaviour before
issue 14), and BentoML's own `traffic.max_concurrency` (`--bentoml-limit`, ours off), which never
sheds an inline async endpoint (see `bentos/protocol.py`).

State: the feedback-loop benchmark's demo shop (`--users 5000 --items 2000 --events 500000`,
trained once), built into `--state` with that benchmark's code and reused when it exists. The
machine is shared (2 cores): compare the configurations of one run, not runs of different days.

Target (issue 14): p99 of admitted requests under 100 ms at 256 connections; health within 50 ms.

Usage:
    .venv/bin/python benchmarks/overload_benchmark.py [--state DIR] [--limits 0 8 16 32]
        [--bentoml-limit N] [--connections 256] [--duration S] [--warmup S] [--repeats N]

Prints a table and writes JSON to `benchmarks/results/overload_benchmark.json`.
"""

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from feedback_loop_benchmark import BUILD_RECORD, build_state
from harness import (
    RESULTS_DIR,
    benchmark_user_ids,
    exit_on_sigterm,
    format_table,
    median_figures,
    percentile_ms,
    recommend_lua,
    report_head,
    serve,
    shop_arguments,
    state_copy,
    state_env,
    state_record,
    write_json,
    wrk_command,
)

RESULTS = RESULTS_DIR / "overload_benchmark.json"
DEFAULT_STATE = Path(tempfile.gettempdir()) / "shelfwise-overload-benchmark"
SERVICE = "bentos/service.py:RecommendationService"
TARGET_P99_MS = 100.0  # admitted requests, at 256 connections
TARGET_HEALTH_MS = 50.0  # /readyz and /livez under that load
MEASURING_CONNECTIONS = 16  # of `--connections`; wrk drives the others
PROBE_INTERVAL_S = 0.05
PROBE_TIMEOUT_S = 5.0
CLIENT_MODES = ("ignores Retry-After", "honours Retry-After")
ADMITTED_METRIC = re.compile(
    r'^bentoml_service_request_total\{endpoint="/recommend",http_response_code="200"[^}]*\} (\S+)',
    re.MULTILINE,
)
SHED_METRIC = re.compile(r"^shelfwise_shed_requests_total (\S+)", re.MULTILINE)

# After `recommend_lua`'s bodies: with HONOUR, the request after a 429 waits its Retry-After.
RETRY_AFTER_LUA = """\
local honour = %(honour)s
local wait_ms = 0
response = function(status, headers, body)
  if honour and status == 429 then
    wait_ms = (tonumber(headers["retry-after"] or headers["Retry-After"]) or 1) * 1000
  end
end
delay = function()
  local ms = wait_ms
  wait_ms = 0
  return ms
end
"""


# --- the measuring client ----------------------------------------------------------------------


@dataclass
class Tally:
    """One measured window: the measuring connections' latencies by status, the probes'
    latencies by route (`PROBE_TIMEOUT_S` for a probe left unanswered) and the server's
    counters at the window's start and end."""

    start: float
    end: float
    latencies_s: dict[int, list[float]] = field(default_factory=dict)
    probes_s: dict[str, list[float]] = field(default_factory=dict)
    probe_failures: int = 0
    counters: list[tuple[float, float, float]] = field(default_factory=list)  # admitted, shed, t

    def record(self, status: int, started: float, now: float) -> None:
        if self.start <= started and now <= self.end:
            self.latencies_s.setdefault(status, []).append(now - started)


class Connection(asyncio.Protocol):
    """One keep-alive connection sending `requests` in turn, each as soon as the last is answered
    (after a 429's `Retry-After` when the driver says so); records each answer's status and
    latency in the driver's current tally."""

    def __init__(self, requests: list[bytes], driver: "Driver") -> None:
        self.requests, self.driver = requests, driver
        self.answered, self.buffer, self.started = 0, b"", 0.0
        self.stopping = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if self.stopping or self.transport is None or self.transport.is_closing():
            return
        self.started = time.perf_counter()
        self.transport.write(self.requests[self.answered % len(self.requests)])

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
        self.buffer = self.buffer[end + 4 + length :]
        self.answered += 1
        status = int(head[9:12])
        if self.driver.tally is not None:
            self.driver.tally.record(status, self.started, now)
        wait_at = head.find(b"retry-after:")
        if self.driver.honour_retry_after and wait_at >= 0:
            wait_s = float(head[wait_at + 12 :].split(b"\r\n", 1)[0])
            asyncio.get_running_loop().call_later(wait_s, self.send)
        else:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopping:
            self.driver.closed += 1


def post(path: str, body: dict[str, Any]) -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode() + raw


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` on a new connection (closed by the request): status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Driver:
    """The measuring connections, the health probes and the server's counters."""

    def __init__(self, port: int, requests: list[bytes], connections: int) -> None:
        self.port, self.requests, self.connections = port, requests, connections
        self.opened: list[Connection] = []
        self.tally: Tally | None = None
        self.closed = 0  # measuring connections the server closed
        self.honour_retry_after = False
        self.metrics: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.metrics_lock = asyncio.Lock()
        self.keeper: asyncio.Task[None] | None = None

    async def keep_metrics_alive(self) -> None:
        """Reads the counters every 2 s, within uvicorn's 5 s keep-alive timeout."""
        while True:
            await asyncio.sleep(2)
            await self.counters()

    async def open(self) -> None:
        await self.counters()  # opens the metrics connection before the load
        self.keeper = asyncio.create_task(self.keep_metrics_alive())
        loop = asyncio.get_running_loop()
        for number in range(self.connections):
            at = number * 97 % len(self.requests)  # each starts elsewhere in the bodies
            shifted = self.requests[at:] + self.requests[:at]
            _, protocol = await loop.create_connection(
                lambda shifted=shifted: Connection(shifted, self), "127.0.0.1", self.port
            )
            self.opened.append(protocol)

    async def counters(self) -> tuple[float, float, float]:
        """The server's (admitted /recommend, shed) counters and when they were read.

        On a connection kept open from the start, so that reading them never waits for an
        accept; the time between two reads is the window's true length."""
        async with self.metrics_lock:
            if self.metrics is None:
                self.metrics = await asyncio.open_connection("127.0.0.1", self.port)
            reader, writer = self.metrics
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            text = (await reader.readexactly(length)).decode()
        admitted, shed = ADMITTED_METRIC.search(text), SHED_METRIC.search(text)
        return (
            float(admitted.group(1)) if admitted else 0.0,
            float(shed.group(1)) if shed else 0.0,
            time.perf_counter(),
        )

    async def window(self, seconds: float) -> Tally:
        """One measured window of `seconds`, with a probe every `PROBE_INTERVAL_S`."""
        before = await self.counters()
        self.tally = tally = Tally(start=time.perf_counter(), end=time.perf_counter() + seconds)
        probes, number = [], 0
        while time.perf_counter() < tally.end:
            path = ("/readyz", "/livez")[number % 2]
            probes.append(asyncio.create_task(self.probe(path, tally)))
            number += 1
            await asyncio.sleep(PROBE_INTERVAL_S)
        tally.counters = [before, await self.counters()]
        await asyncio.gather(*probes)
        self.tally = None
        return tally

    async def probe(self, path: str, tally: Tally) -> None:
        """GET `path` on a new connection; records its latency (or a failure)."""
        began = time.perf_counter()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                status, _ = await http_get(self.port, path)
        except (TimeoutError, OSError, IndexError, ValueError):
            status = 0
        tally.probes_s.setdefault(path, []).append(time.perf_counter() - began)
        tally.probe_failures += status != 200

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.cancel()
        if self.metrics is not None:
            self.metrics[1].close()
        for connection in self.opened:
            connection.stopping = True
            if connection.transport is not None:
                connection.transport.close()


def pending_accepts(port: int) -> int:
    """Connections the server's listening socket holds, not yet accepted (`ss`'s Recv-Q)."""
    lines = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return sum(int(line.split()[1]) for line in lines if line.strip())


async def measure(
    port: int,
    requests: list[bytes],
    wrk_command: list[str],
    honour: bool,
    warmup_s: float,
    seconds: float,
    windows: int,
    ramp_timeout_s: float,
) -> tuple[float, list[Tally], int]:
    """One client mode: wrk's load plus the measuring connections; returns the seconds until the
    server had accepted every connection, the windows and the connections it closed."""
    driver = Driver(port, requests, MEASURING_CONNECTIONS)
    driver.honour_retry_after = honour
    wrk = await asyncio.create_subprocess_exec(
        *wrk_command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    began = time.perf_counter()
    try:
        await driver.open()
        await asyncio.sleep(1.0)  # wrk has connected by then
        while pending_accepts(port) or any(not c.answered for c in driver.opened):
            if time.perf_counter() - began > ramp_timeout_s:
                raise RuntimeError(f"connections still not accepted after {ramp_timeout_s:.0f} s")
            await asyncio.sleep(0.2)
        ramp_s = time.perf_counter() - began
        await asyncio.sleep(warmup_s)
        tallies = [await driver.window(seconds) for _ in range(windows)]
    finally:
        driver.close()
        wrk.terminate()
        await wrk.wait()
    return ramp_s, tallies, driver.closed


# --- figures -----------------------------------------------------------------------------------


def figures_of(tally: Tally) -> dict[str, float]:
    """Admitted throughput and latency, shed share and probe latency of one window."""
    (admitted_before, shed_before, read_before), (admitted_after, shed_after, read_after) = (
        tally.counters
    )
    admitted_count, shed_count = admitted_after - admitted_before, shed_after - shed_before
    answered = admitted_count + shed_count
    seconds = read_after - read_before
    admitted = tally.latencies_s.get(200, [])
    readyz, livez = tally.probes_s.get("/readyz", []), tally.probes_s.get("/livez", [])
    return {
        "admitted_rps": admitted_count / seconds,
        "shed_share": shed_count / answered if answered else 0.0,
        "p50_ms": percentile_ms(admitted, 0.50),
        "p95_ms": percentile_ms(admitted, 0.95),
        "p99_ms": percentile_ms(admitted, 0.99),
        "max_ms": percentile_ms(admitted, 1.0),
        "sampled_admitted": len(admitted),
        "sampled_shed": len(tally.latencies_s.get(429, [])),  # BentoML's own 429s too
        "sampled_other_statuses": sum(
            len(values) for status, values in tally.latencies_s.items() if status not in (200, 429)
        ),
        "readyz_p50_ms": percentile_ms(readyz, 0.50),
        "readyz_p99_ms": percentile_ms(readyz, 0.99),
        "readyz_max_ms": percentile_ms(readyz, 1.0),
        "livez_p50_ms": percentile_ms(livez, 0.50),
        "livez_max_ms": percentile_ms(livez, 1.0),
        "probes": len(readyz) + len(livez),
        "probe_failures": tally.probe_failures,
    }


# --- the benchmark -----------------------------------------------------------------------------


def configurations(args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    """(name, server environment) of every configuration measured."""
    found = [
        (f"limit {limit}" if limit else "no limit", {"SHELFWISE_MAX_CONCURRENCY": str(limit)})
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
    record = state_record(home, BUILD_RECORD)
    if record is not None:
        return record
    if home.exists() and any(home.iterdir()):
        raise SystemExit(f"{home} exists but was not built by the feedback-loop benchmark's code")
    return build_state(home, args)


def wrk_script(user_ids: list[str], honour: bool) -> str:
    return recommend_lua(user_ids) + RETRY_AFTER_LUA % {"honour": "true" if honour else "false"}


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    rows = [
        [
            "configuration",
            "client",
            "admitted/s",
            "shed",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "/readyz p50",
            "/readyz p99",
            "/livez p99*",
            "probes failed",
        ]
    ]
    for result in results.values():
        m = result["median"]
        rows.append(
            [
                result["configuration"],
                result["client"],
                f"{m['admitted_rps']:,.0f}",
                f"{m['shed_share']:.0%}",
                f"{m['p50_ms']:.1f}",
                f"{m['p95_ms']:.1f}",
                f"{m['p99_ms']:.1f}",
                f"{m['max_ms']:.0f}",
                f"{m['readyz_p50_ms']:.1f}",
                f"{m['readyz_p99_ms']:.1f}",
                f"{m['livez_max_ms']:.1f}",
                f"{m['probe_failures']:.0f}",
            ]
        )
    print(
        f"\n/recommend at {args.connections} connections (closed loop), one worker; medians of "
        f"{args.repeats} windows of {args.duration:g} s; latencies in ms; probes on a new "
        "connection each (* max, ~50 probes per window)\n"
    )
    print(format_table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="state folder")
    shop_arguments(parser, users=5_000, items=2_000, days=35, events=500_000)
    parser.add_argument("--limits", type=int, nargs="+", default=[0, 8, 16, 32])
    parser.add_argument("--bentoml-limit", type=int, default=16, help="0: leave it out")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the windows")
    parser.add_argument("--repeats", type=int, default=3, help="windows per client mode")
    parser.add_argument("--ramp-timeout", type=float, default=300.0)
    parser.add_argument("--user-ids", type=int, default=2_000)
    parser.add_argument("--unknown-share", type=float, default=0.1)
    parser.add_argument("--port", type=int, default=3730)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    exit_on_sigterm()

    home = args.state.resolve()
    build = ensure_state(home, args)
    user_ids = benchmark_user_ids(home / "lake", args.user_ids, args.unknown_share, args.seed)
    requests = [post("/recommend", {"user_id": user, "k": 10}) for user in user_ids]
    scratch = Path(tempfile.mkdtemp(prefix="overload-benchmark-"))
    scripts = {}
    for mode in CLIENT_MODES:
        scripts[mode] = scratch / f"{CLIENT_MODES.index(mode)}.lua"
        scripts[mode].write_text(wrk_script(user_ids, honour=mode == "honours Retry-After"))
    run_seconds = 600  # wrk is stopped when the windows are done
    results: dict[str, Any] = {}
    began = time.perf_counter()
    for name, env in configurations(args):
        print(f"{name}: serving …", flush=True)
        log = scratch / "bentoml.log"
        with (
            state_copy(home, scratch, "state") as copy,
            serve(SERVICE, state_env(copy, extra=env), args.port, log, grace=60) as server,
        ):
            for mode in CLIENT_MODES:
                load = args.connections - MEASURING_CONNECTIONS
                url = f"{server.url}/recommend"
                command = wrk_command(url, scripts[mode], load, run_seconds)
                ramp_s, tallies, closed = uvloop.run(
                    measure(
                        args.port,
                        requests,
                        command,
                        mode == "honours Retry-After",
                        args.warmup,
                        args.duration,
                        args.repeats,
                        args.ramp_timeout,
                    )
                )
                runs = [figures_of(tally) for tally in tallies]
                for run in runs:
                    print(
                        f"  client {mode}: admitted {run['admitted_rps']:.0f} req/s, shed "
                        f"{run['shed_share']:.0%}, p99 {run['p99_ms']:.1f} ms, /readyz p99 "
                        f"{run['readyz_p99_ms']:.1f} ms (ramp-up {ramp_s:.0f} s)",
                        flush=True,
                    )
                results[f"{name} | {mode}"] = {
                    "configuration": name,
                    "client": mode,
                    "env": env,
                    "ramp_up_seconds": round(ramp_s, 1),
                    "measuring_connections_closed_by_server": closed,
                    "runs": runs,
                    "median": median_figures(runs, digits=1),
                }
    elapsed = time.perf_counter() - began
    print_table(results, args)

    report = {
        **report_head(
            "overload", ("bentoml", "uvicorn", "uvloop", "httptools", "lightgbm"), wrk=True
        ),
        "config": {
            "state": str(home),
            "build": build,
            "service": SERVICE,
            "workers": 1,
            "connections": args.connections,
            "load": f"wrk -t1 -c{args.connections - MEASURING_CONNECTIONS} (keep-alive)",
            "measuring_connections": MEASURING_CONNECTIONS,
            "client_modes": list(CLIENT_MODES),
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
    write_json(args.output, report)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
