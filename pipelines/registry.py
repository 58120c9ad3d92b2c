"""Import-cheap registry of pipelines: names map to ``module:factory`` import paths.

Nothing heavy is imported until :func:`create` is called, so the SCP starts without
torch or monai.  A factory takes the pipeline's options mapping (config
``[pipelines.<name>]``) and returns a :class:`pipelines.base.Pipeline`; bad options
raise ``node.config.ConfigError``-style ``ValueError`` naming ``pipelines.<name>.<key>``.

Each entry holds its pipeline's **version**, the one place it is written: the pipeline modules
read it from here (``VERSION = registry.entry(NAME).version``), and the node keys routed jobs by
it (``node.routing.input_key``) without importing the pipeline, so after an upgrade the same
inputs make a new job whose results supersede the old ones.  Bump it whenever a change can
alter a result.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.base import Pipeline


@dataclass(frozen=True)
class Resources:
    """What one job of the pipeline needs on a worker (read by distributed runners, no import of the pipeline)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int = 0  # 0: no request


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:factory"
    level: str  # "series" or "study"
    summary: str
    version: str  # the pipeline's version: in its results, their SR, and the key of its jobs
    resources: Resources = Resources()


_ENTRIES = (
    Entry("tissue-hu", "pipelines.tissue_hu:create", "series",
          "Body mask, adipose (-190..-30 HU) and soft tissue (-29..150 HU) on every slice", "1.0.0"),
    Entry("body-composition", "pipelines.body_composition.pipeline:create", "series",
          "L3/C3 muscle, SAT, VAT, IMAT, SMI and sarcopenia; psoas and erector spinae in 2D and 3D", "0.3.0"),
    Entry("tumour-radiomics", "pipelines.radiomics.pipeline:create", "study",
          "Intratumoral and 3/6/9 mm peritumoral radiomics from a received SEG or RTSTRUCT ROI", "1.0.0"),
    Entry("dual-phase", "pipelines.dualphase.pipeline:create", "study",
          "Arterial and portal-venous series registered and featurised together", "1.0.0"),
    Entry("deep-features", "pipelines.deep.pipeline:create", "study",
          "MONAI encoder features (2D/3D) with attention maps", "1.0.0",
          Resources(cpus=1.0, gpus=1.0)),
    Entry("survival-risk", "pipelines.survival.pipeline:create", "series",
          "Risk score and risk group from a fitted survival model (header, SR or cohort-feature inputs), as a "
          "TID 1500 SR", "1.1.0"),
)
REGISTRY: dict[str, Entry] = {e.name: e for e in _ENTRIES}


def names() -> list[str]:
    return list(REGISTRY)


def entry(name: str) -> Entry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(REGISTRY)}") from None


def version(name: str) -> str:
    """The version of pipeline ``name`` (import-cheap: its module is not imported)."""
    return entry(name).version


def create(name: str, options: Mapping[str, Any] | None = None) -> Pipeline:
    """Import the pipeline's module and build it with its options."""
    module_name, factory_name = entry(name).target.split(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    pipeline: Pipeline = factory(dict(options or {}))
    return pipeline
