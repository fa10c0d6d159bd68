"""Serving an online experiment: which recommender answers which user, and team-draft interleaving.

The experiment itself is configuration (`shelfwise.experiments`); this module turns the running
one into answers, without any web framework:

- each arm becomes a recommender sharing the production recommender's snapshot, neighbours and
  rules (`LiveExperiment.bind`): `production` is the production recommender itself, `ranker`
  the same with the arm's own booster and segment policy (`Recommender.with_ranker`; its
  features must be the ones the snapshot was loaded for), `candidates` the candidate order on
  purpose (`Recommender.without_ranker`, fallback level 0: intended, not a degradation) and
  `popular` the shop's popular items through the business rules (`Recommender.popular`);
- in split mode a user's arm (`Experiment.arm_of`) answers alone;
- in interleave mode both arms answer with k items (each list after the business rules) and
  `team_draft` merges them, its coins seeded by the response's `rec_id`, so a list can be
  drawn again exactly; each item keeps the arm that drafted it.
"""

import hashlib
import logging
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from models.business_rules import RequestFilters
from models.ranker import booster_from_text
from models.recommender import RankedItem, Recommendation, Recommender
from models.segments import SegmentPolicy
from models.session import Session
from shelfwise.experiments import Arm, Experiment, ExperimentError, read_arm_ranker
from shelfwise.lake import Lake
from shelfwise.runtime.online_state import StockChange

logger = logging.getLogger(__name__)

# The response's `arm` when two arms were interleaved (each item names its own).
INTERLEAVED = "interleaved"

T = TypeVar("T")


class ExperimentRefused(ExperimentError):
    """An experiment this service cannot serve; production serves instead.

    A ranker arm's model is missing or unreadable, or scores other features than the serving
    snapshot holds.
    """


def team_draft(
    first: Sequence[T],
    second: Sequence[T],
    k: int,
    seed: str,
    key: Callable[[T], Hashable] | None = None,
) -> list[tuple[T, int]]:
    """Team-draft interleaving of two rankings (Radlinski, Kurup and Joachims, 2008).

    In each round a coin decides which team picks first; then each team in turn adds its best
    item not yet in the list. So each team's items keep that team's order, and while both
    have items left the teams' counts differ by at most one. A team that runs out leaves the
    other to pick alone.

    Args:
        first: Team 0's ranking, best first.
        second: Team 1's ranking, best first.
        k: At most this many items.
        seed: Seeds the coins (the response's `rec_id`): the same seed draws the same list.
        key: An item's identity (default: the item itself); an item both teams rank is taken
            once, by the team that picks it first.

    Returns:
        Up to k `(item, team)` pairs, in list order; fewer only when both rankings together
        hold fewer distinct items.
    """
    identity = key or (lambda item: item)
    rankings = (first, second)
    # A seed of our own hash, not Python's `hash()`, which differs between processes.
    digest = hashlib.blake2b(seed.encode(), digest_size=8).digest()
    coins = random.Random(int.from_bytes(digest, "big"))
    merged: list[tuple[T, int]] = []
    taken: set[Hashable] = set()
    next_index = [0, 0]
    while len(merged) < k:
        leader = coins.getrandbits(1)
        picked = False
        for team in (leader, 1 - leader):
            if len(merged) >= k:
                break
            ranking, index = rankings[team], next_index[team]
            while index < len(ranking) and identity(ranking[index]) in taken:
                index += 1
            if index < len(ranking):
                merged.append((ranking[index], team))
                taken.add(identity(ranking[index]))
                index += 1
                picked = True
            next_index[team] = index
        if not picked:
            break
    return merged


@dataclass(frozen=True)
class ArmModel:
    """A ranker arm's model, as loaded from its copy in the lake.

    Attributes:
        tag: The registered ranker (`shelfwise_ranker:<version>`), the arm's model version.
        booster: The LightGBM booster.
        features: The features it scores, in its order.
        segment_policy: The segment policy shipped with it, if any.
    """

    tag: str
    booster: object
    features: list[str]
    segment_policy: SegmentPolicy | None


def load_arm_models(lake: Lake, experiment: Experiment) -> dict[str, ArmModel]:
    """The models of an experiment's ranker arms from the lake, by arm name.

    Raises:
        ExperimentRefused: A copy is missing, or its booster or info is unreadable.
    """
    models = {}
    for arm in experiment.arms:
        if arm.kind != "ranker":
            continue
        try:
            text, info = read_arm_ranker(lake, experiment.name, arm.name)
            booster = booster_from_text(text)
            features = [str(name) for name in info["features"]]
            policy = SegmentPolicy.from_dict(info.get("segment_policy"))
        except Exception as error:  # LightGBM's own errors are no ExperimentError
            raise ExperimentRefused(f"arm '{arm.name}': {error}") from error
        models[arm.name] = ArmModel(str(arm.model), booster, features, policy)
    return models


@dataclass(frozen=True)
class ServedArm:
    """One arm bound to the production recommender: what answers its users.

    Attributes:
        arm: The arm.
        recommender: Its recommender (sharing the production recommender's snapshot).
        model_version: The ranker that orders its lists (None: no ranker).
    """

    arm: Arm
    recommender: Recommender
    model_version: str | None

    def answer(
        self,
        user_id: str,
        k: int,
        filters: RequestFilters,
        session: Session,
        context_item_id: str | None,
        stock: Mapping[str, StockChange],
        need_rows: bool = False,
    ) -> Recommendation:
        """The arm's answer to a request (arguments as for `Recommender.recommend`)."""
        if self.arm.kind == "popular":
            return self.recommender.popular(user_id, k, filters, session, stock)
        return self.recommender.recommend(
            user_id, k, filters, session, context_item_id, stock, need_rows
        )


@dataclass(frozen=True)
class ExperimentAnswer:
    """An answer under an experiment.

    Attributes:
        recommendation: The list served. When interleaving: the drafted items, each scored by
            its position (higher first, so ordering by score keeps the draft), the control's
            strategy and rows, and the larger of the two arms' fallback levels.
        experiment: The experiment's name.
        arm: The arm that answered, or `INTERLEAVED`.
        model_version: The answering arm's ranker; when interleaving, the control's.
        drafted_by: When interleaving, per item the arm that drafted it; else None.
        item_model_versions: When interleaving, per item the drafting arm's ranker; else None.
    """

    recommendation: Recommendation
    experiment: str
    arm: str
    model_version: str | None
    drafted_by: list[str] | None = None
    item_model_versions: list[str | None] | None = None


class LiveExperiment:
    """The running experiment, ready to answer requests.

    Built aside (the arms' models loaded from the lake) and swapped in by one reference; its
    arms are bound to the production recommender on first use, and again whenever production
    is swapped (`bind` keeps the arms of the last production it saw).

    Args:
        experiment: The running experiment.
        models: Its ranker arms' models, by arm name (`load_arm_models`).

    Raises:
        ExperimentRefused: A ranker arm has no model.
    """

    def __init__(self, experiment: Experiment, models: Mapping[str, ArmModel]) -> None:
        missing = [a.name for a in experiment.arms if a.kind == "ranker" and a.name not in models]
        if missing:
            raise ExperimentRefused(f"arms {missing}: no model loaded")
        self.experiment = experiment
        self._models = dict(models)
        # (production recommender, its arms): replaced whole, so a reader sees one pair.
        self._bound: tuple[Recommender, dict[str, ServedArm]] | None = None

    @property
    def name(self) -> str:
        """The experiment's name."""
        return self.experiment.name

    def bind(self, production: Recommender, production_version: str | None) -> dict[str, ServedArm]:
        """The arms bound to a production recommender, by name (cached per recommender).

        Args:
            production: The recommender production serves.
            production_version: Its ranker's tag (None: no ranker).

        Raises:
            ExperimentRefused: A ranker arm scores other features than `production` (whose
                features the snapshot was loaded for).
        """
        bound = self._bound
        if bound is not None and bound[0] is production:
            return bound[1]
        arms = {}
        for arm in self.experiment.arms:
            if arm.kind == "production":
                served = ServedArm(arm, production, production_version)
            elif arm.kind == "ranker":
                model = self._models[arm.name]
                if model.features != production.feature_names:
                    raise ExperimentRefused(
                        f"arm '{arm.name}': {model.tag} scores {len(model.features)} features "
                        f"that are not the {len(production.feature_names)} the serving snapshot "
                        f"was loaded for ({_difference(model.features, production.feature_names)})"
                    )
                recommender = production.with_ranker(model.booster, model.segment_policy)
                served = ServedArm(arm, recommender, model.tag)
            elif arm.kind == "candidates":
                served = ServedArm(arm, production.without_ranker(), None)
            else:  # popular
                served = ServedArm(arm, production, None)
            arms[arm.name] = served
        self._bound = (production, arms)
        return arms

    def recommend(
        self,
        production: Recommender,
        production_version: str | None,
        user_id: str,
        k: int,
        filters: RequestFilters,
        session: Session,
        context_item_id: str | None,
        stock: Mapping[str, StockChange],
        rec_id: str,
        need_rows: bool = False,
    ) -> ExperimentAnswer:
        """Answers a request under the experiment.

        Args:
            production: The recommender production serves (the arms share its snapshot).
            production_version: Its ranker's tag.
            user_id: The user.
            k: How many items.
            filters: The request's filters.
            session: The user's live session.
            context_item_id: The item on the page, if any.
            stock: Stock updates.
            rec_id: The response's id: seeds the interleaving's coins.
            need_rows: Re-rank for the ranked rows (see `Recommender.recommend`).

        Raises:
            ExperimentRefused: The arms cannot be bound to `production` (see `bind`).
        """
        arms = self.bind(production, production_version)
        request = (user_id, k, filters, session, context_item_id, stock, need_rows)
        if self.experiment.mode == "split":
            served = arms[self.experiment.arm_of(user_id).name]
            answer = served.answer(*request)
            return ExperimentAnswer(answer, self.name, served.arm.name, served.model_version)
        control, other = (arms[arm.name] for arm in self.experiment.arms)
        first, second = control.answer(*request), other.answer(*request)
        drafted = team_draft(first.items, second.items, k, rec_id, key=lambda item: item.item_id)
        teams = [(control, other)[team] for _, team in drafted]
        items = [
            RankedItem(item.item_id, float(len(drafted) - position), item.source)
            for position, (item, _) in enumerate(drafted)
        ]
        level = max(first.fallback_level, second.fallback_level)
        return ExperimentAnswer(
            Recommendation(items, first.strategy, level, first.rows),
            self.name,
            INTERLEAVED,
            control.model_version,
            drafted_by=[team.arm.name for team in teams],
            item_model_versions=[team.model_version for team in teams],
        )


def _difference(features: list[str], expected: list[str]) -> str:
    """What differs between two feature lists, briefly, for a log line."""
    extra = [name for name in features if name not in expected]
    missing = [name for name in expected if name not in features]
    if not extra and not missing:
        return "same features in another order"
    return f"extra {extra[:5]}, missing {missing[:5]}"
