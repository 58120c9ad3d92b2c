"""pipelines.common.options: config mappings into frozen option dataclasses, errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipelines.common.options import parse_options, reject_unknown


@dataclass(frozen=True)
class Opts:
    name: str
    rings_mm: tuple[float, ...] = (3.0, 6.0)
    window: tuple[float, float] = (-200.0, 300.0)
    size: int = 64
    threshold: float = 0.5
    enabled: bool = True


def test_parse_coerces_by_annotation() -> None:
    o = parse_options(Opts, {"name": "a", "rings_mm": [3, 9], "window": [-100, 200], "threshold": 1}, "demo")
    assert o == Opts("a", (3.0, 9.0), (-100.0, 200.0), 64, 1.0, True)
    assert parse_options(Opts, {"name": "a", "rings_mm": 5}, "demo").rings_mm == (5.0,)


@pytest.mark.parametrize(("options", "message"), [
    ({"name": "a", "colour": 1}, "pipelines.demo.colour: unknown option (known: enabled, name,"),
    ({}, "pipelines.demo.name: required"),
    ({"name": "a", "size": 1.5}, "pipelines.demo.size: expected an integer"),
    ({"name": "a", "size": True}, "pipelines.demo.size: expected an integer"),
    ({"name": "a", "enabled": 1}, "pipelines.demo.enabled: expected true or false"),
    ({"name": "a", "threshold": float("nan")}, "pipelines.demo.threshold: expected a number"),
    ({"name": 3}, "pipelines.demo.name: expected a text"),
    ({"name": "a", "window": [1, 2, 3]}, "pipelines.demo.window: expected 2 values"),
    ({"name": "a", "rings_mm": [3, "x"]}, "pipelines.demo.rings_mm[1]: expected a number"),
])
def test_errors_name_the_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_options(Opts, options, "demo")
    assert str(e.value).startswith(message)


def test_reject_unknown_and_pipeline_options() -> None:
    reject_unknown({"a": 1}, {"a", "b"}, "demo")
    with pytest.raises(ValueError, match=r"^pipelines\.demo\.c: unknown option"):
        reject_unknown({"c": 1}, {"a", "b"}, "demo")
    from pipelines.dualphase.pipeline import DualPhaseOptions
    from pipelines.radiomics.pipeline import RadiomicsOptions
    assert RadiomicsOptions.from_mapping({"rings_mm": [3, 6]}).rings_mm == (3.0, 6.0)
    with pytest.raises(ValueError, match=r"^pipelines\.dual-phase\.max_shift_mm: expected a number"):
        DualPhaseOptions.from_mapping({"max_shift_mm": "far"})
