"""The runner registry: ``[runner] kind`` picks where jobs run, not code.

Each kind maps to a ``module:function`` import path that takes the config and the test factories
and returns a :class:`node.jobs.Runner`; the module is imported only when its kind is chosen, so
the local default (and the receive path) never imports a distributed engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

from node.config import Config
from node.jobs import LocalProcessRunner, Runner, pipeline_modules

RUNNERS: dict[str, str] = {
    "local": "node.runners:local_runner",
    "ray": "node.ray_runner:ray_runner",
}


def route_pipelines(config: Config) -> list[str]:
    return list(dict.fromkeys(p for r in config.routes for p in r.pipelines))


def local_runner(config: Config, factories: Mapping[str, str]) -> Runner:
    """A process pool on this host (the embedded default; nothing extra installed)."""
    return LocalProcessRunner(config.jobs.workers, preload=pipeline_modules(route_pipelines(config), factories),
                              log_level=config.logging.level)


def build_runner(config: Config, factories: Mapping[str, str] | None = None) -> Runner:
    try:
        target = RUNNERS[config.runner.kind]
    except KeyError:
        raise ValueError(f"runner.kind: unknown {config.runner.kind!r}; known: {', '.join(RUNNERS)}") from None
    module, name = target.split(":")
    make: Callable[[Config, Mapping[str, str]], Runner] = getattr(importlib.import_module(module), name)
    return make(config, dict(factories or {}))
