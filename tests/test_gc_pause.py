"""gc_paused: automatic collection off inside, restored after (nested, and when it was off)."""

from __future__ import annotations

import gc

import pytest

from pipelines.common.gc_pause import gc_paused


def test_gc_paused_nested_restores() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still holds it off
    assert gc.isenabled()


def test_gc_paused_restores_on_error_and_keeps_disabled() -> None:
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("stage failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: left off
    finally:
        gc.enable()
