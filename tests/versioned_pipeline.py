"""tissue-hu with its version set by the option ``test_version`` (a factory for node tests): a
re-run after a pipeline upgrade, without editing the pipeline.  The version goes where the real
one goes (the pipeline's ``version``, the SR's algorithm version and the summary)."""

from __future__ import annotations

from typing import Any

from pipelines import tissue_hu


def create(options: dict[str, Any]) -> tissue_hu.TissueHuPipeline:
    options = dict(options)
    version = str(options.pop("test_version", tissue_hu.VERSION))
    tissue_hu.VERSION = version  # this worker process only: read by the SR's algorithm identification
    pipeline = tissue_hu.create(options)
    pipeline.version = version  # type: ignore[misc]
    return pipeline
