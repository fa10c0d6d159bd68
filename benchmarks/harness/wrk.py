"""`wrk` runs: the command, a Lua reporter that prints the run as JSON, the `/recommend` load
(bodies cycling through a sample of user ids) and the parsing of a run's figures."""

import json
import random
import re
import subprocess
from pathlib import Path
from typing import Any

LATENCIES_MS = ("p50_ms", "p95_ms", "p99_ms", "max_ms")

# Appended to a script: prints `WRK_JSON {…}` when the run is done, with the sum over wrk's
# threads of each global counter the script names (numbering the threads in `tid` meanwhile).
REPORT_LUA = """
local threads = {}
local created = 0
function setup(thread)
  created = created + 1
  thread:set("tid", created)
  table.insert(threads, thread)
end
function done(summary, latency, requests)
  local e = summary.errors
  local fields = {
    string.format('"requests": %d, "duration_us": %d', summary.requests, summary.duration),
    string.format('"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d',
      latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max),
  }
  for _, name in ipairs({COUNTERS}) do
    local total = 0
    for _, thread in ipairs(threads) do
      total = total + thread:get(name)
    end
    table.insert(fields, string.format('"%s": %d', name, total))
  end
  io.write("WRK_JSON {" .. table.concat(fields, ", ") .. "}\\n")
end
"""

RECOMMEND_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {BODIES}
local n = 0
request = function()
  n = n % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[n])
end
"""


def report_lua(*counters: str) -> str:
    """The reporter `wrk_json` reads, summing the scripts' global `counters` over the threads."""
    return REPORT_LUA.replace("COUNTERS", ", ".join(f'"{name}"' for name in counters))


def recommend_lua(
    user_ids: list[str],
    k: int = 10,
    explain: bool = False,
    session_items: list[str | None] | None = None,
) -> str:
    """Lua posting `{"user_id": …, "k": k}` bodies to wrk's URL in turn (no reporter); with
    `explain`, each body asks for explanations (`"explain": true`); with `session_items`, the
    body of each user with an item there carries it as the client's session
    (`"context": {"session_item_ids": [item]}`), so it is re-ranked with the session."""
    extra = {"explain": True} if explain else {}
    items = session_items or [None] * len(user_ids)
    bodies = ", ".join(
        "'"
        + json.dumps(
            {
                "user_id": user,
                "k": k,
                **extra,
                **({"context": {"session_item_ids": [item]}} if item else {}),
            }
        )
        + "'"
        for user, item in zip(user_ids, items, strict=True)
    )
    return RECOMMEND_LUA.replace("BODIES", bodies)


def wrk_command(
    url: str,
    script: Path,
    concurrency: int,
    seconds: float,
    script_args: list[str] | None = None,
    latency: bool = False,
) -> list[str]:
    """wrk with one client thread, keep-alive connections and a 10 s timeout."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s"]
    command += ["--latency"] if latency else []
    command += ["-s", str(script), url]
    return command + (["--", *script_args] if script_args else [])


def wrk_json(command: list[str]) -> dict[str, Any]:
    """Runs a `wrk_command` whose script ends in `report_lua()`: its JSON, plus `errors` (every
    kind summed), `seconds`, `requests_per_second` and the latencies in ms (`LATENCIES_MS`)."""
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    found = re.search(r"^WRK_JSON (.*)$", done.stdout, re.MULTILINE)
    if not found:
        raise RuntimeError(f"wrk said:\n{done.stdout}\n{done.stderr}")
    raw = json.loads(found.group(1))
    raw["errors"] = sum(raw[kind] for kind in ("connect", "read", "write", "status", "timeout"))
    raw["seconds"] = raw["duration_us"] / 1e6
    raw["requests_per_second"] = raw["requests"] / raw["seconds"]
    for key in LATENCIES_MS:
        raw[key] = raw[key.replace("_ms", "_us")] / 1000
    return raw


def benchmark_user_ids(lake: Path, count: int, unknown_share: float, seed: int) -> list[str]:
    """`count` user ids, shuffled: users the lake has candidates for and a share never seen."""
    import polars as pl

    from shelfwise.lake import SERVING_CANDIDATES

    users = pl.scan_parquet(lake / SERVING_CANDIDATES).select(pl.col("user_id").unique())
    known = sorted(users.collect().get_column("user_id").to_list())
    rng = random.Random(seed)
    unknown = round(count * unknown_share)
    ids = rng.sample(known, min(len(known), count - unknown))
    ids += [f"never-seen-{n}" for n in range(unknown)]
    rng.shuffle(ids)
    return ids
