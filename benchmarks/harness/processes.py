"""Process trees from /proc: their memory (sampled in a thread) and CPU, commands run with their
output in a log, and child processes that answer with a line of JSON."""

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from .state import ROOT

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _parents() -> dict[int, int]:
    """pid → parent pid of every process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces and parentheses: the parent follows the last ')'.
            parents[int(entry.name)] = int(
                (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            )
        except (OSError, IndexError, ValueError):
            continue
    return parents


def process_tree(root: int, parents: dict[int, int] | None = None) -> list[int]:
    """`root` and all its descendants, each after its parent, from /proc."""
    children: dict[int, list[int]] = {}
    for pid, parent in (_parents() if parents is None else parents).items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def memory_kib(pid: int, pss: bool = False) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; zeros when it is gone.

    PSS only with `pss` (from smaps_rollup, which walks the page tables: dearer), else 0.
    """
    try:
        if not pss:
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB, 0
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (OSError, IndexError, ValueError):
        return 0, 0
    fields = dict(re.findall(r"^(Rss|Pss):\s+(\d+) kB", text, re.MULTILINE))
    return int(fields.get("Rss", 0)), int(fields.get("Pss", 0))


def mib(kib: float) -> float:
    """KiB in MiB, to 0.1."""
    return round(kib / 1024, 1)


class Background:
    """Runs `_run` in a daemon thread from the start of a `with` block to its end, when `_stop`
    is set."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class TreeMemory(Background):
    """Samples the memory of a process tree from /proc in a background thread.

    Keeps the peak RSS of the whole tree (and its PSS with `pss`), the most processes seen, and
    per pid the peak RSS of that process and its descendants together (`subtree_peak_kib`: the
    memory of one step whose work runs in children of its process).
    """

    def __init__(self, root: int, interval: float = 0.5, pss: bool = False) -> None:
        super().__init__()
        self.root, self.interval, self.pss = root, interval, pss
        self.peak_rss_kib = self.peak_pss_kib = self.processes = 0
        self.subtree_peak_kib: dict[int, int] = {}

    def _measure(self) -> tuple[int, int, int, dict[int, int]]:
        parents = _parents()
        if self.root not in parents:
            return 0, 0, 0, {}
        pids = process_tree(self.root, parents)
        sizes = {pid: memory_kib(pid, self.pss) for pid in pids}
        subtree = {pid: rss for pid, (rss, _) in sizes.items()}
        for pid in reversed(pids[1:]):  # children before their parents
            subtree[parents[pid]] += subtree[pid]
        pss = sum(p for _, p in sizes.values())
        return subtree[self.root], pss, len(pids), subtree

    def sample(self) -> tuple[int, int, int]:
        """(RSS KiB, PSS KiB, processes) of the tree now."""
        rss, pss, processes, _ = self._measure()
        return rss, pss, processes

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss, processes, subtree = self._measure()
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.processes = max(self.processes, processes)
            for pid, kib in subtree.items():
                self.subtree_peak_kib[pid] = max(self.subtree_peak_kib.get(pid, 0), kib)
            self._stop.wait(self.interval)


def cpu_ticks(pid: int) -> int:
    """CPU time one process used so far (user + system), in clock ticks; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


class CpuMeter:
    """CPU used during a measurement (in cores): by the server's process tree, by wrk (and other
    children of this script), by this script, and by everything else on the machine, the noise of
    a shared machine."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    @staticmethod
    def _busy() -> int:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    def _server(self) -> int:
        return sum(cpu_ticks(pid) for pid in process_tree(self.server_pid))

    def __enter__(self) -> "CpuMeter":
        self._start = (
            time.perf_counter(),
            self._busy(),
            self._server(),
            resource.getrusage(resource.RUSAGE_CHILDREN),
            resource.getrusage(resource.RUSAGE_SELF),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        started, busy, server, children, own = self._start
        elapsed = time.perf_counter() - started
        children_now = resource.getrusage(resource.RUSAGE_CHILDREN)
        own_now = resource.getrusage(resource.RUSAGE_SELF)
        clients = (children_now.ru_utime + children_now.ru_stime) - (
            children.ru_utime + children.ru_stime
        )
        mine = (own_now.ru_utime + own_now.ru_stime) - (own.ru_utime + own.ru_stime)
        total = (self._busy() - busy) / self.TICK
        serving = (self._server() - server) / self.TICK
        self.cores = {
            "server": round(serving / elapsed, 2),
            "client": round((clients + mine) / elapsed, 2),
            "other": round(max(0.0, total - serving - clients - mine) / elapsed, 2),
        }


def wait_for_quiet(cores: float, timeout: float, window: float = 2.0) -> dict[str, float]:
    """Waits until the machine's busy CPU over `window` s is below `cores` (our server idles
    meanwhile, so that is other people's work), at most `timeout` s; what was seen."""
    started = time.perf_counter()
    while True:
        before, begun = CpuMeter._busy(), time.perf_counter()
        time.sleep(window)
        busy = (CpuMeter._busy() - before) / CpuMeter.TICK / (time.perf_counter() - begun)
        waited = time.perf_counter() - started
        if busy < cores or waited >= timeout:
            return {"busy_cores_before": round(busy, 2), "waited_s": round(waited, 1)}


def load_average() -> float:
    """The 1-minute load average: how busy the machine was."""
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass
class Measured:
    """A command run by `run_logged`: its exit code, wall time and its process tree's memory."""

    returncode: int
    seconds: float
    peak_rss_kib: int
    subtree_peak_kib: dict[int, int]


def run_logged(
    command: list[str], env: dict[str, str], log: Path, check: bool = False, append: bool = True
) -> Measured:
    """Runs `command` from the project root, its output in `log` after a `$ command` line,
    sampling its process tree's memory; raises when it fails and `check` says so."""
    started = time.perf_counter()
    with log.open("ab" if append else "wb") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with TreeMemory(process.pid) as memory:
            code = process.wait()
    if code != 0 and check:
        raise RuntimeError(f"{' '.join(command[:4])}… failed ({code}); see {log}")
    seconds = time.perf_counter() - started
    return Measured(code, seconds, memory.peak_rss_kib, memory.subtree_peak_kib)


class ChildFailed(RuntimeError):
    """A child process printed no result line; `stderr` holds what it said."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


def print_result(marker: str, result: Any) -> None:
    """The line a child prints for `child_json` to read."""
    print(f"{marker} {json.dumps(result)}", flush=True)


def child_json(args: list[str], env: dict[str, str], marker: str) -> Any:
    """Runs `python ARGS` from the project root; the JSON it printed with `print_result`.

    Raises:
        ChildFailed: It printed none (its output's tail is in the message).
    """
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    found = re.search(rf"^{marker} (.*)$", done.stdout, re.MULTILINE)
    if not found:
        raise ChildFailed(
            f"{Path(args[0]).name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
            f"{done.stderr[-3000:]}",
            done.stderr,
        )
    return json.loads(found.group(1))
