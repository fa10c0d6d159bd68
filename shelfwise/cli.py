"""The `shelfwise` command line: set up local state, generate a demo shop, show how to use it."""

import argparse
import sys
from datetime import date

from shelfwise.home import prepare_home
from shelfwise.lake import SERVING_CANDIDATES, Lake
from shelfwise.settings import Settings


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")


def _init(args: argparse.Namespace, settings: Settings) -> int:
    prepare_home(settings)
    _say(f"Shelfwise home: {settings.home} (lake: {settings.lake_url})")
    return 0


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from shelfwise.generate import ShopConfig, generate_shop, write_shop
    from shelfwise.ingest import lake_has_events

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

    banner = commands.add_parser("demo-banner", help="print the demo's URLs and a curl")
    banner.add_argument("--host", default="127.0.0.1")
    banner.add_argument("--serve-port", type=int, default=3000)
    banner.add_argument("--ui-port", type=int, default=3001)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the `shelfwise` command line."""
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    handlers = {"init": _init, "generate": _generate, "demo-banner": _demo_banner}
    return handlers[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
