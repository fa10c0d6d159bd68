"""The Shelfwise recommendation service (BentoML).

`POST /recommend` re-ranks the user's precomputed candidates with the packaged ranker; users
without history get popular items. The ranker is the production model of the BentoML model store
(`shelfwise_production:latest`, a copy of the promoted ranker; see `shelfwise.registry`), declared
below so `bentoml build` packs it into the bento; the serving snapshot comes from the lake.
"""

import json
import logging
import uuid
from pathlib import Path
from typing import Annotated

import bentoml
from pydantic import BaseModel, ConfigDict, Field

from models.business_rules import RequestFilters
from models.serving import Recommender
from shelfwise.lake import Lake
from shelfwise.registry import PRODUCTION_MODEL_NAME, RANKER_FILE, RANKER_INFO_FILE, SOURCE_TAG
from shelfwise.settings import Settings

logger = logging.getLogger("bentoml.shelfwise")


class RecommendedItem(BaseModel):
    item_id: str = Field(description="The recommended item.")
    score: float = Field(
        description="Ranker score (higher is better); not comparable across users."
    )
    source: str = Field(description="What ranked it: ranker, candidates or popular.")


class RecommendFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category_ids: list[str] | None = Field(None, description="Only items of these categories.")
    exclude_item_ids: list[str] = Field(default_factory=list, description="Never these items.")
    price_max: float | None = Field(None, ge=0, description="Only items at most this expensive.")
    in_stock_only: bool = Field(True, description="Only items in stock.")

    def to_rules(self) -> RequestFilters:
        return RequestFilters(
            category_ids=frozenset(self.category_ids) if self.category_ids is not None else None,
            exclude_item_ids=frozenset(self.exclude_item_ids),
            price_max=self.price_max,
            in_stock_only=self.in_stock_only,
        )


class RecommendResponse(BaseModel):
    model_config = ConfigDict(
        # BentoML's OpenAPI 3.0 schema takes the singular `example`.
        json_schema_extra={
            "example": {
                "rec_id": "3f1c9a0e6b5d4c7e8f90a1b2c3d4e5f6",
                "items": [{"item_id": "i42", "score": 1.73, "source": "ranker"}],
                "strategy": "personalized",
                "fallback_level": 0,
                "model_version": "shelfwise_ranker:abc123",
            }
        }
    )

    rec_id: str = Field(description="Identifies this response (for impressions and feedback).")
    items: list[RecommendedItem]
    strategy: str = Field(description="personalized (known user) or popular (no history).")
    fallback_level: int = Field(
        description="0 as intended; 1 the ranker was unavailable (candidate order); "
        "2 the candidates were unavailable (popular items)."
    )
    model_version: str | None = Field(description="The ranker's tag; null when none is loaded.")


@bentoml.service(name="shelfwise", traffic={"timeout": 10})
class RecommendationService:
    # Declared as a dependency: `bentoml build` packs the production model into the bento.
    production_model = bentoml.models.BentoModel(f"{PRODUCTION_MODEL_NAME}:latest")

    def __init__(self) -> None:
        settings = Settings.from_env()
        lake = Lake(settings.lake_url)
        booster, features, self.model_version = None, None, None
        try:
            model = self.production_model
            model_dir = Path(model.path)
            import lightgbm as lgb

            booster = lgb.Booster(model_file=str(model_dir / RANKER_FILE))
            features = json.loads((model_dir / RANKER_INFO_FILE).read_text())["features"]
            # The promoted ranker's tag, not the production copy's: what training knows.
            self.model_version = str(model.info.metadata.get(SOURCE_TAG) or model.tag)
        except Exception:  # a missing or corrupt model degrades the service, never kills it
            logger.exception("No usable production ranker: serving the candidate order")
        try:
            self.recommender = Recommender.from_lake(
                lake, booster, features, settings.max_per_category
            )
        except ValueError:  # the snapshot was built for other features than this ranker's
            logger.exception("Serving snapshot does not fit the ranker: serving without it")
            self.model_version = None
            self.recommender = Recommender.from_lake(lake, None, None, settings.max_per_category)
        logger.info(
            "Serving %s for %d known users from %s",
            self.model_version,
            self.recommender.known_users,
            settings.lake_url,
        )

    @bentoml.api(route="/recommend")
    def recommend(
        self,
        user_id: Annotated[str, Field(min_length=1, description='The shopper, e.g. "u1".')],
        k: Annotated[int, Field(ge=1, le=100, description="How many items.")] = 10,
        filters: RecommendFilters | None = None,
    ) -> RecommendResponse:
        """Top-k items for a user: their candidates re-ranked by the ranker, or popular items,
        filtered by the business rules (already bought, out of stock, the request's filters)."""
        answer = self.recommender.recommend(user_id, k, filters.to_rules() if filters else None)
        return RecommendResponse(
            rec_id=uuid.uuid4().hex,
            items=[RecommendedItem(**vars(item)) for item in answer.items],
            strategy=answer.strategy,
            fallback_level=answer.fallback_level,
            model_version=self.model_version,
        )
