"""Dagster run configuration derived from the `models` dataclasses, so each default is written once.

A Dagster `Config` is a pydantic model and a `models` parameter set is a frozen dataclass; rather
than re-typing the dataclass's fields (and their defaults drifting apart), `config_from` builds
the Config class from the dataclass: the same names, types and defaults, the descriptions taken
from the dataclass's `Attributes:` docstring section, plus fields only the asset needs (chunk
sizes, samples). `to_params` turns a run's config back into the dataclass.
"""

import dataclasses
import inspect
import re
import typing
from typing import Any, TypeVar

import dagster as dg
import pydantic

Params = TypeVar("Params")


def _attribute_docs(dataclass_type: type) -> dict[str, str]:
    """The `Attributes:` section of a Google-style docstring: name → description."""
    doc = inspect.getdoc(dataclass_type) or ""
    section = doc.partition("Attributes:")[2]
    described: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        if match := re.match(r"^    (\w+): (.*)$", line):
            name = match.group(1)
            described[name] = match.group(2)
        elif name and line.startswith("        "):
            described[name] += " " + line.strip()
        elif line.strip():
            break
    return described


def config_from(
    dataclass_type: type,
    name: str,
    doc: str,
    extra: dict[str, tuple[Any, Any, str]] | None = None,
) -> type[dg.Config]:
    """A Dagster Config class with the fields and defaults of a `models` dataclass.

    Args:
        dataclass_type: The parameter dataclass (e.g. `models.candidates.CandidateConfig`).
        name: The Config class's name (shown in the Dagster UI).
        doc: Its description.
        extra: Fields the asset adds: name → (type, default, description).

    Returns:
        The Config class; `to_params(config, dataclass_type)` gives the dataclass back.
    """
    hints = typing.get_type_hints(dataclass_type)
    docs = _attribute_docs(dataclass_type)
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {"__doc__": doc, "__module__": __name__}
    for field in dataclasses.fields(dataclass_type):
        annotations[field.name] = hints[field.name]
        namespace[field.name] = pydantic.Field(
            default=field.default, description=docs.get(field.name)
        )
    for field_name, (kind, default, description) in (extra or {}).items():
        annotations[field_name] = kind
        namespace[field_name] = pydantic.Field(default=default, description=description)
    namespace["__annotations__"] = annotations
    return type(name, (dg.Config,), namespace)


def to_params(config: dg.Config, dataclass_type: type[Params]) -> Params:
    """The `models` dataclass a run's config stands for (its extra fields left out)."""
    names = [field.name for field in dataclasses.fields(dataclass_type)]
    return dataclass_type(**{name: getattr(config, name) for name in names})
