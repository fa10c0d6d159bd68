"""The Shelfwise recommendation service (BentoML).

`POST /recommend` re-ranks the user's precomputed candidates with the packaged ranker; users
without history get popular items. The ranker is the production model of the BentoML model store
(`shelfwise_production:latest`, a copy of the promoted ranker; see `shelfwise.registry`), declared
below so `bentoml build` packs it into the bento; the serving snapshot comes from the lake.
"""

import json
import logging
from pathlib import Path
from typing import Annotated

import bentoml
from pydantic import BaseModel, ConfigDict, Field

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


class RecommendResponse(BaseModel):
    model_config = ConfigDict(
        # BentoML's OpenAPI 3.0 schema takes the singular `example`.
        json_schema_extra={
            "example": {
                "items": [{"item_id": "i42", "score": 1.73, "source": "ranker"}],
                "strategy": "personalized",
                "model_version": "shelfwise_ranker:abc123",
            }
        }
    )

    items: list[RecommendedItem]
    strategy: str = Field(description="personalized (known user) or popular (no history).")
    model_version: str | None = Field(description="The ranker's tag; null when none is loaded.")


@bentoml.service(name="shelfwise", traffic={"timeout": 10})
class RecommendationService:
    # Declared as a dependency: `bentoml build` packs the production model into the bento.
    production_model = bentoml.models.BentoModel(f"{PRODUCTION_MODEL_NAME}:latest")

    def __init__(self) -> None:
        settings = Settings.from_env()
        model = self.production_model
        model_dir = Path(model.path)
        import lightgbm as lgb

        booster = lgb.Booster(model_file=str(model_dir / RANKER_FILE))
        info = json.loads((model_dir / RANKER_INFO_FILE).read_text())
        # The promoted ranker's tag, not the production copy's: what training and evaluation know.
        self.model_version = str(model.info.metadata.get(SOURCE_TAG) or model.tag)
        self.recommender = Recommender.from_lake(
            Lake(settings.lake_url), booster, feature_names=info["features"]
        )
        logger.info(
            "Serving %s (as %s) for %d known users from %s",
            self.model_version,
            model.tag,
            self.recommender.known_users,
            settings.lake_url,
        )

    @bentoml.api(route="/recommend")
    def recommend(
        self,
        user_id: Annotated[str, Field(min_length=1, description='The shopper, e.g. "u1".')],
        k: Annotated[int, Field(ge=1, le=100, description="How many items.")] = 10,
    ) -> RecommendResponse:
        """Top-k items for a user: their candidates re-ranked by the ranker, or popular items."""
        answer = self.recommender.recommend(user_id, k)
        return RecommendResponse(
            items=[RecommendedItem(**vars(item)) for item in answer.items],
            strategy=answer.strategy,
            model_version=self.model_version,
        )
