"""Prints the blocking checks that failed in the latest run, after a failed `make pipeline`.

A held landing batch or a refused ranker stops the run with Dagster's
`DagsterAssetCheckFailedError`, whose message names only the check; the explanation (which
batch, why, the command that goes on; which baseline the ranker did not beat) is the check's
description, buried in the run's log. The Makefile runs `python -m orchestration.failed_checks`
when the materialization fails, so the last thing on the console is what to do next.
"""

import sys

import dagster as dg

from orchestration.assets.lake import VALID_BATCHES_CHECK
from orchestration.assets.promotion import GATE_CHECK

BLOCKING_CHECKS = (
    dg.AssetCheckKey(dg.AssetKey("raw_events"), VALID_BATCHES_CHECK),
    dg.AssetCheckKey(dg.AssetKey("registered_model"), GATE_CHECK),
)


def failed_checks(instance: dg.DagsterInstance) -> list[tuple[str, str]]:
    """The blocking checks that failed in the instance's latest run, with their descriptions."""
    runs = instance.get_runs(limit=1)
    if not runs:
        return []
    latest = runs[0].run_id
    failed = []
    for key in BLOCKING_CHECKS:
        record = instance.get_latest_asset_check_evaluation_record(key)
        # A check the run planned but never reached is PLANNED; its status enum is not public.
        if record and record.run_id == latest and record.status.value == "FAILED":
            failed.append((key.to_user_string(), record.evaluation.description or ""))
    return failed


def main() -> int:
    """Prints the latest run's failed blocking checks; exits 0 (the caller keeps its own status)."""
    with dg.DagsterInstance.get() as instance:
        for name, description in failed_checks(instance):
            sys.stderr.write(f"\n{name} failed:\n{description}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
