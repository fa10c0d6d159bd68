"""The `shelfwise` command line: set up state, generate or import a shop, models, experiments."""

import argparse
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

from shelfwise.contracts import EVENT_TYPES
from shelfwise.home import prepare_home
from shelfwise.intake.importers import (
    DEFAULT_BATCH_ROWS,
    FORMATS,
    TIMESTAMP_UNITS,
    ImportReport,
    import_files,
)
from shelfwise.lake import SERVING_CANDIDATES, STOCK_UPDATES, Lake
from shelfwise.settings import Settings


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")


def _init(args: argparse.Namespace, settings: Settings) -> int:
    prepare_home(settings)
    _say(f"Shelfwise home: {settings.home} (lake: {settings.lake_url})")
    return 0


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from shelfwise.intake.generate import ShopConfig, generate_shop, write_shop
    from shelfwise.intake.ingest import lake_has_events

    lake = Lake(args.lake or settings.lake_url)
    if args.if_empty and lake_has_events(lake):
        _say(f"The lake at {lake.url} already holds events; not generating a demo shop.")
        return 0
    config = ShopConfig(
        users=args.users,
        items=args.items,
        days=args.days,
        events=args.events,
        seed=args.seed,
        end_date=args.end_date,
    )
    _say(
        f"Generating a demo shop: {config.users:,} users, {config.items:,} items, "
        f"~{config.events:,} events over {config.days} days (seed {config.seed})…"
    )
    counts = write_shop(generate_shop(config), lake, seed=config.seed)
    _say(
        f"Wrote {counts['events']:,} events, {counts['items']:,} items and {counts['users']:,} "
        f"users to {lake.uri('landing')}; `make pipeline` ingests them."
    )
    return 0


def _import(args: argparse.Namespace, settings: Settings) -> int:
    lake = Lake(args.lake or settings.lake_url)
    try:
        report = import_files(
            lake,
            args.paths,
            args.format,
            mapping=dict(args.map) or None,
            event_types=dict(args.map_event) or None,
            event_type=args.event_type,
            timestamp_unit=args.timestamp_unit,
            timestamp_format=args.timestamp_format,
            timezone=args.timezone,
            not_recommendable=_id_list(args.not_recommendable),
            catalog=args.catalog,
            catalog_mapping=dict(args.catalog_map) or None,
            batch_rows=args.batch_rows,
        )
    except (ValueError, OSError) as error:  # ContractError is a ValueError
        sys.stderr.write(f"shelfwise import: {error}\n")
        return 2
    _describe_import(report, lake)
    return 0


def _id_list(values: list[str]) -> list[str]:
    """`ID[,ID…]` or `@FILE` (one id per line, `#` comments) arguments as one list of ids."""
    ids: list[str] = []
    for value in values:
        if value.startswith("@"):
            lines = Path(value[1:]).read_text(encoding="utf-8").splitlines()
            ids += [line.split("#", 1)[0] for line in lines]
        else:
            ids += value.split(",")
    return [item.strip() for item in ids if item.strip()]


def _describe_checks(report: ImportReport) -> None:
    """Per file: rows read, rows that will land, rows set aside and rejected by reason."""
    for check in report.checks:
        _say(
            f"{check.source}: {check.rows:,} event rows; {check.rows_to_land:,} will land, "
            f"{sum(check.set_aside.values()):,} set aside, {check.rows_rejected:,} invalid."
        )
        for title, counts in (("set aside", check.set_aside), ("invalid", check.rejected)):
            for reason, rows in sorted(counts.items(), key=lambda pair: (-pair[1], pair[0])):
                _say(f"  {title}: {reason}: {rows:,}")
        for hold in check.holds:
            _say("Ingestion will hold this batch with the default threshold:")
            _say(hold.message())


def _describe_import(report: ImportReport, lake: Lake, listed: int = 20) -> None:
    _say(
        f"Imported {report.rows_read:,} rows ({report.format}) from {len(report.sources)} "
        f"file(s) into {lake.uri('landing')}: {report.events_written:,} events, "
        f"{report.items_written:,} items, {report.users_written:,} users, "
        f"{len(report.files_written)} file(s)."
    )
    for relpath in report.files_written[:listed]:
        _say(f"  wrote {relpath}")
    if len(report.files_written) > listed:
        _say(f"  … and {len(report.files_written) - listed} more")
    if report.sessions_derived:
        _say("Sessions derived per user by a 30-minute inactivity gap.")
    if report.rows_malformed:
        _say(f"Skipped {report.rows_malformed:,} malformed row(s) (wrong number of fields):")
        for text in report.malformed_rows:
            _say(f"  {text}")
    if report.unknown_event_types:
        found = ", ".join(f"{k!r} ×{v:,}" for k, v in sorted(report.unknown_event_types.items()))
        _say(f"Unknown event types kept for ingestion to quarantine: {found}")
    if report.unreadable_values:
        found = ", ".join(f"{k} ×{v:,}" for k, v in sorted(report.unreadable_values.items()))
        _say(f"Unreadable values landed as nulls: {found}")
    _describe_checks(report)
    _say("Run the pipeline (or `make pipeline`) to ingest them.")


def _compact(args: argparse.Namespace, settings: Settings) -> int:
    from shelfwise.runtime.feedback import compact_feedback

    lake = Lake(args.lake or settings.lake_url)
    result = compact_feedback(settings.wal_dir, lake)
    _say(
        f"Compacted {result.segments} log segment(s) from {settings.wal_dir} into {lake.url}: "
        f"{result.events:,} events, {result.impressions:,} impressions, "
        f"{result.rows[STOCK_UPDATES]:,} stock updates, "
        f"{result.feature_samples:,} sampled feature rows, {len(result.files)} file(s)."
    )
    for relpath in result.files[:20]:
        _say(f"  wrote {relpath}")
    if len(result.files) > 20:
        _say(f"  … and {len(result.files) - 20} more")
    duplicates = sum(result.duplicates.values())
    if duplicates:
        _say(f"Dropped {duplicates:,} duplicate row(s) (same event_id or impression).")
    if result.orphaned:
        _say(f"Recovered {result.orphaned} segment(s) of writers that had stopped.")
    if result.torn_bytes:
        _say(f"Skipped {result.torn_bytes:,} byte(s) of torn, never acknowledged writes.")
    if result.live:
        _say(f"Left {result.live} open segment(s) of running writers for a later run.")
    if result.failed:
        _say(
            f"Moved {len(result.failed)} segment(s) that do not fit the contract to "
            f"{settings.wal_dir / 'failed'}: {', '.join(result.failed)}"
        )
        return 1
    return 0


def _retrain(args: argparse.Namespace, settings: Settings) -> int:
    # The Dagster job, through Dagster's own CLI: the run is recorded in DAGSTER_HOME and shows in
    # the UI like a sensor's or the schedule's (and `shelfwise` stays free of orchestration code).
    prepare_home(settings)
    dagster = str(Path(sys.executable).with_name("dagster"))
    env = {
        **os.environ,
        "SHELFWISE_HOME": str(settings.home),
        "SHELFWISE_LAKE": settings.lake_url,
        "DAGSTER_HOME": str(settings.dagster_home),
        "BENTOML_HOME": str(settings.bentoml_home),
    }
    command = [dagster, "job", "execute", "-m", "orchestration.definitions", "-j", "retraining"]
    _say(f"Retraining on {settings.lake_url} (the Dagster job 'retraining'; see `make ui`).")
    return subprocess.run(command, env=env, check=False).returncode


def _models_list(args: argparse.Namespace, settings: Settings) -> int:
    from shelfwise.runtime.registry import describe_rankers, production

    home = settings.bentoml_home
    records = describe_rankers(home)
    current = production(home)
    if args.json:
        payload = {
            "production": None
            if current is None
            else {
                "tag": current.tag,
                "source_tag": current.source_tag,
                "previous_source_tag": current.previous_source_tag,
                "action": current.action,
                "promoted_at": current.promoted_at.isoformat(),
                "metrics": current.metrics,
            },
            "rankers": [
                {
                    "tag": record.tag,
                    "created_at": record.created_at.isoformat(),
                    "production": record.production,
                    "metrics": record.metrics,
                    "data_fingerprint": record.data_fingerprint,
                    "code_version": record.code_version,
                }
                for record in records
            ],
        }
        _say(json.dumps(payload, indent=2))
        return 0
    if not records:
        _say(f"No rankers in {home / 'models'} yet; run the pipeline to train one.")
        return 0
    _say(f"{'':2}{'tag':<34} {'created (UTC)':<19} {'ndcg@10':>8}  {'data':<14} code")
    for record in records:
        ndcg = record.metrics.get("ndcg@10")
        _say(
            f"{'*' if record.production else '':2}{record.tag:<34} "
            f"{record.created_at.strftime('%Y-%m-%d %H:%M:%S'):<19} "
            f"{'-' if ndcg is None else f'{ndcg:.4f}':>8}  "
            f"{(record.data_fingerprint or '-')[:14]:<14} {(record.code_version or '-')[:12]}"
        )
    if current is None:
        _say("No production model.")
    else:
        _say(f"* production: {current.source_tag} (as {current.tag}, {current.action})")
    return 0


def _models_promote(args: argparse.Namespace, settings: Settings) -> int:
    from shelfwise.runtime.registry import RegistryError, production, promote

    home = settings.bentoml_home
    before = production(home)
    try:
        tag = promote(home, args.tag)
    except RegistryError as error:
        sys.stderr.write(f"shelfwise models promote: {error}\n")
        return 2
    current = production(home)
    assert current is not None  # promote() just published it
    if before is not None and before.tag == tag:
        _say(f"{current.source_tag} is already production ({tag}).")
    else:
        previous = current.previous_source_tag or "none"
        _say(f"Promoted {current.source_tag} to production as {tag} (previous: {previous}).")
    return 0


def _models_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from shelfwise.runtime.registry import RegistryError, production, rollback

    home = settings.bentoml_home
    before = production(home)
    try:
        tag = rollback(home)
    except RegistryError as error:
        sys.stderr.write(f"shelfwise models rollback: {error}\n")
        return 2
    current = production(home)
    assert current is not None and before is not None  # rollback() needs and publishes one
    _say(f"Rolled production back from {before.source_tag} to {current.source_tag} as {tag}.")
    return 0


def _models(args: argparse.Namespace, settings: Settings) -> int:
    handlers = {"list": _models_list, "promote": _models_promote, "rollback": _models_rollback}
    return handlers[args.models_command](args, settings)


def _experiments_start(args: argparse.Namespace, settings: Settings) -> int:
    from shelfwise.experiments import (
        ExperimentError,
        check_startable,
        experiment_from_config,
        parse_arm,
        publish_arm_ranker,
        read_config_file,
        read_experiments,
        start_experiment,
    )
    from shelfwise.runtime.registry import RegistryError, production_ranker, registered_ranker

    lake = Lake(args.lake or settings.lake_url)
    home = settings.bentoml_home
    try:
        if args.file is not None:
            if args.name or args.mode or args.arm:
                raise ExperimentError("--file: give the experiment as a file or as flags, not both")
            config = read_config_file(Path(args.file))
        else:
            config = {
                "name": args.name,
                "mode": args.mode or "split",
                "arms": [parse_arm(a) for a in args.arm],
            }
            config = {key: value for key, value in config.items() if value}
        experiment = experiment_from_config(config)
        check_startable(read_experiments(lake), experiment)
        # Ranker arms: the registered model, resolved to its full tag, checked and copied into
        # the lake, where every replica finds it.
        current = production_ranker(home)
        arms, copies = [], []
        for index, arm in enumerate(experiment.arms):
            if arm.kind == "ranker":
                try:
                    tag, text, info = registered_ranker(home, str(arm.model))
                except RegistryError as error:
                    raise ExperimentError(f"arms.{index}.model: {error}") from None
                if current is not None and info.get("features") != current[1].get("features"):
                    raise ExperimentError(
                        f"arms.{index}.model: {tag} scores other features than the production "
                        "ranker, for which the serving snapshot was built"
                    )
                arm = arm.model_copy(update={"model": tag})
                copies.append((arm.name, text, info))
            arms.append(arm)
        experiment = experiment.model_copy(update={"arms": arms})
        for name, text, info in copies:
            publish_arm_ranker(lake, experiment.name, name, text, info)
        start_experiment(lake, experiment)
    except ExperimentError as error:
        sys.stderr.write(f"shelfwise experiments start: {error}\n")
        return 2
    _say(
        f"Started {experiment.mode} experiment {experiment.name} at "
        f"{experiment.started_at.isoformat(timespec='seconds')}: {_arms_text(experiment.arms)}."
    )
    _say(
        "Every replica serves it from its next look at the book "
        f"(SHELFWISE_EXPERIMENT_POLL_S, default 10 s): {lake.url}."
    )
    return 0


def _arms_text(arms) -> str:  # noqa: ANN001 - shelfwise.experiments.Arm, imported lazily
    parts = []
    for arm in arms:
        what = arm.model if arm.kind == "ranker" else arm.kind
        parts.append(f"{arm.name}={what}@{arm.share:g}")
    return ", ".join(parts)


def _experiments_stop(args: argparse.Namespace, settings: Settings) -> int:
    from shelfwise.experiments import ExperimentError, stop_experiment

    lake = Lake(args.lake or settings.lake_url)
    try:
        stopped = stop_experiment(lake, args.name)
    except ExperimentError as error:
        sys.stderr.write(f"shelfwise experiments stop: {error}\n")
        return 2
    assert stopped.stopped_at is not None  # stop_experiment just set it
    _say(
        f"Stopped experiment {stopped.name} at {stopped.stopped_at.isoformat(timespec='seconds')}"
        "; production serves everyone again from each replica's next look at the book."
    )
    return 0


def _experiments_list(args: argparse.Namespace, settings: Settings) -> int:
    from shelfwise.experiments import ExperimentError, read_experiments, status_of

    lake = Lake(args.lake or settings.lake_url)
    try:
        book = read_experiments(lake)
    except ExperimentError as error:
        sys.stderr.write(f"shelfwise experiments list: {error}\n")
        return 2
    if args.json:
        payload = [
            {**experiment.model_dump(mode="json"), "status": status_of(experiment)}
            for experiment in book
        ]
        _say(json.dumps(payload, indent=2))
        return 0
    if not book:
        _say(f"No experiments in {lake.url} yet; `shelfwise experiments start` starts one.")
        return 0
    _say(
        f"{'name':<24} {'mode':<10} {'status':<9} {'started (UTC)':<19} {'stopped (UTC)':<19} arms"
    )
    for experiment in book:
        stopped = experiment.stopped_at
        _say(
            f"{experiment.name:<24} {experiment.mode:<10} {status_of(experiment):<9} "
            f"{experiment.started_at.strftime('%Y-%m-%d %H:%M:%S'):<19} "
            f"{'-' if stopped is None else stopped.strftime('%Y-%m-%d %H:%M:%S'):<19} "
            f"{_arms_text(experiment.arms)}"
        )
    return 0


def _experiments(args: argparse.Namespace, settings: Settings) -> int:
    handlers = {
        "start": _experiments_start,
        "stop": _experiments_stop,
        "list": _experiments_list,
    }
    return handlers[args.experiments_command](args, settings)


def _pair(text: str) -> tuple[str, str]:
    """`key=value` of `--map`/`--map-event`, both sides non-empty."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _example_user_id(lake: Lake) -> str:
    """A user the serving snapshot knows, so the printed curl shows a personalized answer."""
    if not lake.exists(SERVING_CANDIDATES):
        return "u1"
    users = lake.read_table(SERVING_CANDIDATES, columns=["user_id"]).column("user_id")
    return str(users[0]) if len(users) else "u1"


def _demo_banner(args: argparse.Namespace, settings: Settings) -> int:
    user_id = _example_user_id(Lake(settings.lake_url))
    serve = f"http://{args.host}:{args.serve_port}"
    _say(
        "\nShelfwise is starting (Ctrl-C stops both servers):\n"
        f"  recommendations (BentoML): {serve}   (OpenAPI docs at {serve}/docs)\n"
        f"  pipelines (Dagster UI):    http://{args.host}:{args.ui_port}\n\n"
        "Try, once BentoML reports it is ready:\n"
        f"  curl -s -X POST {serve}/recommend -H 'Content-Type: application/json' \\\n"
        f'       -d \'{{"user_id": "{user_id}", "k": 10}}\'\n'
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `shelfwise` command."""
    parser = argparse.ArgumentParser(prog="shelfwise", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("init", help="create the state folders under SHELFWISE_HOME")

    generate = commands.add_parser("generate", help="write a synthetic demo shop to the lake")
    generate.add_argument("--users", type=int, default=20_000)
    generate.add_argument("--items", type=int, default=5_000)
    generate.add_argument("--days", type=int, default=42)
    generate.add_argument("--events", type=int, default=500_000)
    generate.add_argument("--seed", type=int, default=7)
    generate.add_argument(
        "--end-date",
        type=date.fromisoformat,
        default=None,
        help="exclusive last day (YYYY-MM-DD, UTC); default: today",
    )
    generate.add_argument("--lake", default=None, help="lake URL; default: SHELFWISE_LAKE")
    generate.add_argument(
        "--if-empty", action="store_true", help="do nothing when the lake already holds events"
    )

    imports = commands.add_parser(
        "import",
        help="import a shop's own event files into the lake's landing area",
        description="Import event files, a products file as the catalog (--catalog), and "
        "RetailRocket catalog files into landing/.",
    )
    imports.add_argument("paths", nargs="*", metavar="PATH", help="event files")
    imports.add_argument(
        "--catalog",
        default=None,
        metavar="FILE",
        help="a products file (CSV or Parquet, one row per item) to import as the catalog",
    )
    imports.add_argument(
        "--catalog-map",
        type=_pair,
        action="append",
        default=[],
        metavar="CANONICAL=SOURCE[,SOURCE…]",
        help="the catalog file's columns, e.g. item_id=product_id, brand=brand; "
        "category_path=department,product_category joins levels as 'a > b'",
    )
    imports.add_argument("--format", required=True, choices=FORMATS)
    imports.add_argument(
        "--map",
        type=_pair,
        action="append",
        default=[],
        metavar="CANONICAL=SOURCE",
        help="generic: read a contract column from a source column, e.g. user_id=visitor",
    )
    imports.add_argument(
        "--map-event",
        type=_pair,
        action="append",
        default=[],
        metavar="SOURCE=CANONICAL",
        help="generic: map a raw event type, e.g. click=view",
    )
    imports.add_argument(
        "--event-type",
        choices=EVENT_TYPES,
        default=None,
        help="generic: the event type of every row of a file without an event column "
        "(e.g. purchase for order lines)",
    )
    imports.add_argument(
        "--timestamp-unit", choices=TIMESTAMP_UNITS, default=None, help="generic; default iso"
    )
    imports.add_argument(
        "--timestamp-format",
        default=None,
        metavar="PATTERN",
        help="generic: strftime pattern of the timestamps, e.g. '%%m/%%d/%%Y %%H:%%M'",
    )
    imports.add_argument(
        "--timezone", default=None, help="generic: zone of naive times; default UTC"
    )
    imports.add_argument(
        "--not-recommendable",
        action="append",
        default=[],
        metavar="ID[,ID…]|@FILE",
        help="items never to recommend (fees, postage, gift cards), still counted as history; "
        "@FILE reads one id per line",
    )
    imports.add_argument("--lake", default=None, help="lake URL; default: SHELFWISE_LAKE")
    imports.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS)

    compact = commands.add_parser(
        "compact",
        help="publish the feedback write-ahead log (SHELFWISE_HOME/wal) to the lake as Parquet",
    )
    compact.add_argument("--lake", default=None, help="lake URL; default: SHELFWISE_LAKE")

    commands.add_parser(
        "retrain",
        help="run the retraining job now: ingest feedback, rebuild features, train, gate, promote",
    )
    models = commands.add_parser(
        "models",
        help="list the registered rankers, promote one to production, roll back",
        description="The rankers in the BentoML model store under BENTOML_HOME.",
    )
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="the rankers, newest first; * = production")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    promoting = models_commands.add_parser("promote", help="make a ranker production")
    promoting.add_argument("tag", metavar="TAG", help="shelfwise_ranker:<version> (or a prefix)")
    models_commands.add_parser("rollback", help="restore the previous production ranker")

    experiments = commands.add_parser(
        "experiments",
        help="start, stop and list online experiments (A/B splits and interleaving of rankers)",
        description="The book of experiments in the lake (docs/experiments.md); every replica "
        "of the service follows it.",
    )
    experiments_commands = experiments.add_subparsers(dest="experiments_command", required=True)
    starting = experiments_commands.add_parser(
        "start",
        help="start an experiment (from flags or a JSON/YAML file)",
        description="Start an experiment. The first arm is the control. A ranker arm's "
        "registered model is copied into the lake for every replica.",
    )
    starting.add_argument("--name", default=None, help="unique among all experiments ever run")
    starting.add_argument("--mode", default=None, help="split (the default) or interleave")
    starting.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=KIND[:MODEL][@SHARE]",
        help="an arm: KIND is production, ranker (with MODEL, a shelfwise_ranker tag), "
        "candidates or popular; SHARE its relative share of users in split mode (default 1), "
        "e.g. challenger=ranker:shelfwise_ranker:abc123@0.5",
    )
    starting.add_argument(
        "--file", default=None, metavar="FILE", help="the experiment as JSON or YAML instead"
    )
    starting.add_argument("--lake", default=None, help="lake URL; default: SHELFWISE_LAKE")
    stopping = experiments_commands.add_parser("stop", help="stop a running experiment")
    stopping.add_argument("name", metavar="NAME")
    stopping.add_argument("--lake", default=None, help="lake URL; default: SHELFWISE_LAKE")
    listing_experiments = experiments_commands.add_parser(
        "list", help="every experiment with its mode, status, arms and times"
    )
    listing_experiments.add_argument("--json", action="store_true", help="machine-readable")
    listing_experiments.add_argument(
        "--lake", default=None, help="lake URL; default: SHELFWISE_LAKE"
    )

    banner = commands.add_parser("demo-banner", help="print the demo's URLs and a curl")
    banner.add_argument("--host", default="127.0.0.1")
    banner.add_argument("--serve-port", type=int, default=3000)
    banner.add_argument("--ui-port", type=int, default=3001)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the `shelfwise` command line."""
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    handlers = {
        "init": _init,
        "generate": _generate,
        "import": _import,
        "demo-banner": _demo_banner,
        "compact": _compact,
        "retrain": _retrain,
        "models": _models,
        "experiments": _experiments,
    }
    return handlers[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
