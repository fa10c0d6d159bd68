"""Experiments as configuration (`shelfwise.experiments`), the CLI that writes the book, and the
serving logic of `models.experiments` (team draft; arms bound to a real recommender and booster
of the session's trained shop)."""

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from models.experiments import (
    INTERLEAVED,
    ArmModel,
    ExperimentRefused,
    LiveExperiment,
    load_arm_models,
    team_draft,
)
from models.ranker import booster_from_text
from models.recommender import FALLBACK_NONE, STRATEGY_POPULAR, Recommender
from models.session import Session
from shelfwise.cli import main
from shelfwise.experiments import (
    Experiment,
    ExperimentError,
    ExperimentResults,
    experiment_from_config,
    parse_arm,
    publish_arm_ranker,
    read_arm_ranker,
    read_config_file,
    read_experiments,
    read_results,
    running_experiment,
    start_experiment,
    status_of,
    stop_experiment,
    write_experiments,
    write_results,
)
from shelfwise.lake import EXPERIMENT_RESULTS, EXPERIMENTS, SERVING_CANDIDATES, Lake
from shelfwise.runtime.registry import production_ranker, register_ranker

NOW = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


def split(name: str = "ab", shares=(1.0, 1.0), **extra) -> Experiment:
    kinds = ["production", "popular", "candidates"]
    arms = [
        {"name": f"arm{n}", "kind": kinds[n % 3], "share": share} for n, share in enumerate(shares)
    ]
    return experiment_from_config({"name": name, "mode": "split", "arms": arms, **extra}, NOW)


# -- assignment ---------------------------------------------------------------------------------


def test_a_user_keeps_their_arm_across_copies_of_the_experiment():
    experiment = split(shares=(1, 1, 1))
    again = Experiment.model_validate_json(experiment.model_dump_json())
    users = [f"u{n}" for n in range(500)]
    assert [experiment.arm_of(u).name for u in users] == [again.arm_of(u).name for u in users]
    assert {experiment.arm_of(u).name for u in users} == {"arm0", "arm1", "arm2"}


def test_arm_shares_hold_within_binomial_tolerance():
    experiment = split(shares=(1.0, 1.0, 2.0))
    users = 20_000
    counts = {"arm0": 0, "arm1": 0, "arm2": 0}
    for n in range(users):
        counts[experiment.arm_of(f"user-{n}").name] += 1
    for name, share in (("arm0", 0.25), ("arm1", 0.25), ("arm2", 0.5)):
        sigma = math.sqrt(users * share * (1 - share))
        assert abs(counts[name] - users * share) < 4 * sigma, counts


def test_two_experiments_assign_users_independently():
    first, second = split("first"), split("second")
    users = [f"u{n}" for n in range(4000)]
    same = sum(first.arm_of(u).name == second.arm_of(u).name for u in users)
    # Independent halves agree for half the users; identical hashes would agree for all.
    assert abs(same - 2000) < 4 * math.sqrt(4000 * 0.25)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"mode": "split", "arms": []}, "name:"),
        ({"name": "a/b", "mode": "split", "arms": []}, "name:"),
        ({"name": "x", "mode": "shuffle", "arms": []}, "mode:"),
        ({"name": "x", "mode": "split", "arms": [{"name": "a", "kind": "production"}]}, "arms:"),
        (
            {
                "name": "x",
                "mode": "split",
                "arms": [{"name": "a", "kind": "production"}, {"name": "b", "kind": "ranker"}],
            },
            "arms.1:",
        ),
        (
            {
                "name": "x",
                "mode": "split",
                "arms": [
                    {"name": "a", "kind": "production", "share": 0},
                    {"name": "b", "kind": "popular"},
                ],
            },
            "arms.0.share:",
        ),
        (
            {
                "name": "x",
                "mode": "split",
                "arms": [{"name": "a", "kind": "production"}, {"name": "b", "kind": "best"}],
            },
            "arms.1.kind:",
        ),
        (
            {
                "name": "x",
                "mode": "interleave",
                "arms": [
                    {"name": "a", "kind": "production"},
                    {"name": "b", "kind": "popular"},
                    {"name": "c", "kind": "candidates"},
                ],
            },
            "arms:",
        ),
        (
            {
                "name": "x",
                "mode": "split",
                "arms": [{"name": "a", "kind": "production"}, {"name": "a", "kind": "popular"}],
            },
            "arms:",
        ),
        (
            {
                "name": "x",
                "mode": "split",
                "colour": "red",
                "arms": [{"name": "a", "kind": "production"}, {"name": "b", "kind": "popular"}],
            },
            "colour:",
        ),
    ],
)
def test_a_bad_configuration_is_refused_naming_the_field(config, field):
    with pytest.raises(ExperimentError) as refused:
        experiment_from_config(config, NOW)
    assert str(refused.value).startswith(field), str(refused.value)


def test_arms_from_the_command_line_form():
    assert parse_arm("control=production") == {"name": "control", "kind": "production"}
    assert parse_arm("new=ranker:shelfwise_ranker:abc@0.5") == {
        "name": "new",
        "kind": "ranker",
        "model": "shelfwise_ranker:abc",
        "share": 0.5,
    }
    for bad in ("production", "=popular", "pop=", "pop=popular@half"):
        with pytest.raises(ExperimentError, match="^arms"):
            parse_arm(bad)


def test_configuration_files_in_json_and_yaml(tmp_path: Path):
    config = {
        "name": "files",
        "mode": "interleave",
        "arms": [{"name": "a", "kind": "production"}, {"name": "b", "kind": "candidates"}],
    }
    (tmp_path / "e.json").write_text(json.dumps(config))
    (tmp_path / "e.yaml").write_text(
        "name: files\nmode: interleave\narms:\n"
        "  - {name: a, kind: production}\n  - {name: b, kind: candidates}\n"
    )
    assert read_config_file(tmp_path / "e.json") == read_config_file(tmp_path / "e.yaml") == config
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ExperimentError, match="mapping"):
        read_config_file(tmp_path / "list.yaml")
    with pytest.raises(ExperimentError, match="missing.json"):
        read_config_file(tmp_path / "missing.json")


def test_times_are_stored_in_utc():
    experiment = split(started_at="2026-11-26T12:00:00+02:00")
    assert experiment.started_at == NOW
    assert experiment_from_config(
        {**split().model_dump(), "started_at": "2026-11-26T10:00:00"}
    ).started_at == (NOW)


# -- the book -----------------------------------------------------------------------------------


def test_the_book_round_trips_through_the_lake(tmp_path: Path):
    lake = Lake(str(tmp_path / "lake"))
    assert read_experiments(lake) == []
    book = [
        split("old", stopped_at=NOW + timedelta(hours=1)),
        experiment_from_config(
            {
                "name": "new",
                "mode": "interleave",
                "arms": [
                    {"name": "a", "kind": "production"},
                    {"name": "b", "kind": "ranker", "model": "shelfwise_ranker:v2"},
                ],
            },
            NOW + timedelta(hours=2),
        ),
    ]
    write_experiments(lake, book)
    assert read_experiments(lake) == book
    lake.write_text("[{}]", EXPERIMENTS)
    with pytest.raises(ExperimentError, match="not a valid book"):
        read_experiments(lake)


def test_one_experiment_runs_at_a_time_and_a_stopped_one_serves_no_more(tmp_path: Path):
    lake = Lake(str(tmp_path / "lake"))
    first = split("first")
    start_experiment(lake, first)
    with pytest.raises(ExperimentError, match="'first' is running"):
        start_experiment(lake, split("second"))
    with pytest.raises(ExperimentError, match="^name: .*exists already"):
        start_experiment(lake, split("first"))
    with pytest.raises(ExperimentError, match="^name: no experiment named 'nope'"):
        stop_experiment(lake, "nope")
    stopped = stop_experiment(lake, "first", NOW + timedelta(hours=1))
    assert stopped.stopped_at == NOW + timedelta(hours=1)
    assert status_of(stopped, NOW + timedelta(hours=2)) == "stopped"
    assert running_experiment(read_experiments(lake), NOW + timedelta(hours=2)) is None
    with pytest.raises(ExperimentError, match="'first' is not running"):
        stop_experiment(lake, "first", NOW + timedelta(hours=2))
    later = split("second").model_copy(update={"started_at": NOW + timedelta(hours=2)})
    start_experiment(lake, later)
    assert running_experiment(read_experiments(lake), NOW + timedelta(hours=3)).name == "second"
    assert status_of(later, NOW) == "scheduled"
    # An experiment that would still run when a scheduled one starts is refused too.
    third = split("third").model_copy(update={"started_at": NOW + timedelta(minutes=90)})
    with pytest.raises(ExperimentError, match="'second' is scheduled"):
        start_experiment(lake, third)


def test_results_are_kept_per_experiment_and_a_bad_entry_hides_only_itself(tmp_path: Path):
    lake = Lake(str(tmp_path / "lake"))
    assert read_results(lake) == {}
    result = ExperimentResults(
        updated_at=NOW,
        arms=[{"arm": "a", "impressions": 10, "clicks": 1, "carts": 0, "purchases": 0}],
        winner=None,
    )
    write_results(lake, {"ab": result})
    assert read_results(lake) == {"ab": result}
    document = json.loads(lake.read_text(EXPERIMENT_RESULTS))
    lake.write_text(json.dumps({**document, "broken": {"arms": 3}}), EXPERIMENT_RESULTS)
    assert read_results(lake) == {"ab": result}


# -- team draft ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(30))
def test_team_draft_alternates_keeps_each_arms_order_and_never_repeats(seed):
    rng = random.Random(seed)
    pool = [f"i{n}" for n in range(30)]
    first, second = rng.sample(pool, 10), rng.sample(pool, 10)
    merged = team_draft(first, second, 10, f"rec-{seed}")
    items = [item for item, _ in merged]
    assert len(merged) == 10 and len(set(items)) == 10
    for team, ranking in ((0, first), (1, second)):
        drafted = [item for item, by in merged if by == team]
        assert drafted == sorted(drafted, key=ranking.index), "an arm's order was changed"
        assert all(item in ranking for item in drafted)
    # Drafted by turns: after every prefix the two teams' counts differ by at most one.
    for end in range(1, len(merged) + 1):
        teams = [by for _, by in merged[:end]]
        assert abs(teams.count(0) - teams.count(1)) <= 1
    assert team_draft(first, second, 10, f"rec-{seed}") == merged  # reproducible from the seed


def test_team_draft_coins_vary_with_the_seed_and_a_short_ranking_leaves_the_other_to_pick():
    leaders = {team_draft(["a", "b"], ["c", "d"], 2, f"r{n}")[0][1] for n in range(40)}
    assert leaders == {0, 1}
    merged = team_draft(["a"], ["b", "c", "d", "e"], 4, "seed")
    assert sorted(item for item, _ in merged) == ["a", "b", "c", "d"]
    assert [item for item, by in merged if by == 1] == ["b", "c", "d"]
    assert team_draft(["a", "b"], ["a", "b"], 5, "seed") != []
    assert len(team_draft(["a", "b"], ["a", "b"], 5, "seed")) == 2


# -- arms bound to the session's trained shop -----------------------------------------------------


@pytest.fixture(scope="module")
def shop(pipeline_run):
    """The trained shop's lake, production recommender (LightGBM) and a known user."""
    assert pipeline_run.result.success, pipeline_run.failures
    lake = pipeline_run.lake
    text, info = production_ranker(pipeline_run.settings.bentoml_home)
    booster = booster_from_text(text)
    recommender = Recommender.from_lake(lake, booster, info["features"])
    users = lake.read_frame(SERVING_CANDIDATES).get_column("user_id").unique().sort().to_list()
    return lake, recommender, text, info, users


def test_each_arm_kind_answers_as_it_should(shop, tmp_path):
    lake, production, text, info, users = shop
    one_tree = booster_from_text(text).model_to_string(num_iteration=1)
    experiment = experiment_from_config(
        {
            "name": "kinds",
            "mode": "split",
            "arms": [
                {"name": "control", "kind": "production"},
                {"name": "small", "kind": "ranker", "model": "shelfwise_ranker:small"},
                {"name": "order", "kind": "candidates"},
                {"name": "pop", "kind": "popular"},
            ],
        },
        NOW,
    )
    scratch = Lake(str(tmp_path / "lake"))
    publish_arm_ranker(scratch, "kinds", "small", one_tree, info)
    assert read_arm_ranker(scratch, "kinds", "small") == (one_tree, json.loads(json.dumps(info)))
    live = LiveExperiment(experiment, load_arm_models(scratch, experiment))
    arms = live.bind(production, "shelfwise_ranker:prod")
    assert live.bind(production, "shelfwise_ranker:prod") is arms  # bound once per production
    session = Session()
    user = next(u for u in users if production.recommend(u, 10).strategy == "personalized")
    request = (user, 10, _rules(), session, None, {})
    control = arms["control"].answer(*request)
    assert control.items == production.recommend(user, 10, _rules()).items
    small = arms["small"].answer(*request)
    assert arms["small"].model_version == "shelfwise_ranker:small"
    assert small.fallback_level == FALLBACK_NONE and small.rows is not None
    assert list(small.rows.scores) != list(control.rows.scores)  # the arm's own booster scored
    order = arms["order"].answer(*request)
    assert order.fallback_level == FALLBACK_NONE  # the candidate order, on purpose
    assert [i.item_id for i in order.items] == [
        i.item_id for i in production.with_booster(None).recommend(user, 10, _rules()).items
    ]
    pop = arms["pop"].answer(*request)
    assert pop.strategy == STRATEGY_POPULAR and pop.fallback_level == FALLBACK_NONE
    assert {item.source for item in pop.items} == {"popular"} and len(pop.items) == 10
    unknown = production.recommend("nobody-at-all", 50, _rules())
    popular_ids = [item.item_id for item in unknown.items]
    assert [i.item_id for i in pop.items] == sorted(
        (i.item_id for i in pop.items), key=popular_ids.index
    )
    # Split: each user's answer is their arm's.
    for user in users[:40]:
        answer = live.recommend(production, "v", user, 10, _rules(), session, None, {}, "r")
        assert answer.arm == experiment.arm_of(user).name and answer.drafted_by is None
        assert answer.experiment == "kinds"


def test_interleaving_labels_every_item_with_its_drafting_arm(shop, tmp_path):
    lake, production, text, info, users = shop
    scratch = Lake(str(tmp_path / "lake"))
    one_tree = booster_from_text(text).model_to_string(num_iteration=1)
    publish_arm_ranker(scratch, "il", "small", one_tree, info)
    experiment = experiment_from_config(
        {
            "name": "il",
            "mode": "interleave",
            "arms": [
                {"name": "control", "kind": "production"},
                {"name": "small", "kind": "ranker", "model": "shelfwise_ranker:small"},
            ],
        },
        NOW,
    )
    live = LiveExperiment(experiment, load_arm_models(scratch, experiment))
    drafters = set()
    for n, user in enumerate(users[:30]):
        answer = live.recommend(
            production, "prod", user, 10, _rules(), Session(), None, {}, f"rec-{n}"
        )
        items = [item.item_id for item in answer.recommendation.items]
        assert answer.arm == INTERLEAVED and len(answer.drafted_by) == len(items) == 10
        assert len(set(items)) == 10
        scores = [item.score for item in answer.recommendation.items]
        assert scores == sorted(scores, reverse=True)
        versions = {"control": "prod", "small": "shelfwise_ranker:small"}
        assert answer.item_model_versions == [versions[arm] for arm in answer.drafted_by]
        assert abs(answer.drafted_by.count("control") - answer.drafted_by.count("small")) <= 1
        drafters.update(answer.drafted_by)
        again = live.recommend(
            production, "prod", user, 10, _rules(), Session(), None, {}, f"rec-{n}"
        )
        # The same rec_id draws the same list.
        assert again.recommendation.items == answer.recommendation.items
        assert again.drafted_by == answer.drafted_by
    assert drafters == {"control", "small"}


def test_a_ranker_on_other_features_is_refused(shop):
    lake, production, text, info, users = shop
    experiment = experiment_from_config(
        {
            "name": "other",
            "mode": "split",
            "arms": [
                {"name": "control", "kind": "production"},
                {"name": "odd", "kind": "ranker", "model": "shelfwise_ranker:odd"},
            ],
        },
        NOW,
    )
    features = list(reversed(info["features"]))[:-1]
    odd = ArmModel("shelfwise_ranker:odd", booster_from_text(text), features, None)
    live = LiveExperiment(experiment, {"odd": odd})
    with pytest.raises(ExperimentRefused, match="arm 'odd'.*missing"):
        live.bind(production, "prod")
    with pytest.raises(ExperimentRefused, match="no model"):
        LiveExperiment(experiment, {})
    with pytest.raises(ExperimentRefused, match="arm 'odd'"):
        load_arm_models(lake, experiment)  # never copied into this lake


def _rules():
    from models.business_rules import RequestFilters

    return RequestFilters()


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("SHELFWISE_HOME", str(home))
    monkeypatch.delenv("SHELFWISE_LAKE", raising=False)
    return home


def test_the_cli_starts_lists_and_stops_copying_ranker_arms_into_the_lake(cli_home, capsys):
    bentoml_home = cli_home / "bentoml"
    info = {"features": ["a", "b"]}
    tag = register_ranker(bentoml_home, "booster text", info, {"features": ["a", "b"]}, code="t")
    version = tag.split(":")[1]
    args = ["experiments", "start", "--name", "ab1", "--arm", "control=production"]
    assert main([*args, "--arm", f"new=ranker:shelfwise_ranker:{version[:6]}@0.5"]) == 0
    lake = Lake(str(cli_home / "lake"))
    [experiment] = read_experiments(lake)
    assert experiment.mode == "split"
    assert [(a.name, a.kind, a.model, a.share) for a in experiment.arms] == [
        ("control", "production", None, 1.0),
        ("new", "ranker", tag, 0.5),  # the prefix resolved to the full tag
    ]
    assert read_arm_ranker(lake, "ab1", "new") == ("booster text", info)
    assert "Started split experiment ab1" in capsys.readouterr().out

    assert main(["experiments", "list"]) == 0
    listing = capsys.readouterr().out
    assert "ab1" in listing and "running" in listing and f"new={tag}@0.5" in listing
    assert main(["experiments", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "running"

    assert main([*args[:3], "ab2", "--arm", "a=production", "--arm", "b=popular"]) == 2
    assert "'ab1' is running" in capsys.readouterr().err
    assert main(["experiments", "stop", "ab1"]) == 0
    assert main(["experiments", "stop", "ab1"]) == 2
    assert "'ab1' is not running" in capsys.readouterr().err
    assert status_of(read_experiments(lake)[0]) == "stopped"


def test_the_cli_refuses_an_unknown_tag_and_a_bad_file_naming_the_field(cli_home, tmp_path, capsys):
    start = ["experiments", "start", "--name", "x", "--arm", "a=production"]
    assert main([*start, "--arm", "b=ranker:shelfwise_ranker:nope"]) == 2
    assert "arms.1.model: no ranker shelfwise_ranker:nope" in capsys.readouterr().err
    assert main([*start, "--arm", "b=ranker"]) == 2
    assert "arms.1: arm 'b': a ranker arm names its model" in capsys.readouterr().err
    file = tmp_path / "x.yaml"
    file.write_text("name: x\nmode: split\narms:\n  - {name: a, kind: production, share: -1}\n")
    assert main(["experiments", "start", "--file", str(file)]) == 2
    assert "arms.0.share:" in capsys.readouterr().err
    assert main(["experiments", "start", "--file", str(file), "--name", "y"]) == 2
    assert "not both" in capsys.readouterr().err
    assert read_experiments(Lake(str(cli_home / "lake"))) == []
