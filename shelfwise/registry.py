"""The model registry: rankers saved in the BentoML model store under `BENTOML_HOME`.

The store is opened at an explicit path (never a process-wide default), so a pipeline run, a test
and the service each know exactly which store they use.
"""

import json
from pathlib import Path
from typing import Any

RANKER_MODEL_NAME = "shelfwise_ranker"
RANKER_FILE = "model.txt"
RANKER_INFO_FILE = "model.json"


def _model_store(bentoml_home: Path):  # noqa: ANN202 - BentoML's private type
    from bentoml._internal.models import ModelStore

    return ModelStore(str(bentoml_home / "models"))


def register_ranker(
    bentoml_home: Path, model_text: str, info: dict[str, Any], metadata: dict[str, Any]
) -> str:
    """Saves a trained ranker into the model store.

    Args:
        bentoml_home: The BentoML home holding the store.
        model_text: The LightGBM booster as text (`Booster.model_to_string`).
        info: What the service needs besides the booster (feature list, cutoffs), saved as JSON.
        metadata: Plain values shown by `bentoml models get` (metrics, training window).

    Returns:
        The model's tag, `shelfwise_ranker:<version>`.
    """
    import bentoml

    with bentoml.models.create(
        RANKER_MODEL_NAME, metadata=metadata, _model_store=_model_store(bentoml_home)
    ) as model:
        Path(model.path, RANKER_FILE).write_text(model_text)
        Path(model.path, RANKER_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return str(model.tag)


def list_rankers(bentoml_home: Path) -> list[str]:
    """Tags of the rankers in the store, newest first."""
    store = _model_store(bentoml_home)
    models = [m for m in store.list() if m.tag.name == RANKER_MODEL_NAME]
    return [str(m.tag) for m in sorted(models, key=lambda m: m.creation_time, reverse=True)]
