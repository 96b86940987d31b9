"""fusedisk/gcwatch.py: a slow full collection that freed next to nothing freezes
its survivors (later collections skip them); one that freed much does not."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

from fusedisk import gcwatch


@pytest.fixture
def watching(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(gcwatch, "SLOW_MS", 0.0)  # every collection counts as slow
    gcwatch.install()
    gc.unfreeze()
    try:
        yield
    finally:
        gc.callbacks.remove(gcwatch._watch)
        gc.unfreeze()


def test_a_slow_full_collection_that_freed_nothing_freezes_its_survivors(
        watching: None, caplog: pytest.LogCaptureFixture) -> None:
    kept = [[i] for i in range(20000)]  # long-lived, tracked, no garbage
    caplog.set_level(logging.WARNING, "fusedisk.gcwatch")
    gc.collect()
    assert gc.get_freeze_count() >= len(kept)
    assert "survivors are frozen" in caplog.text
    assert gcwatch.statistics()["gc_freezes"] >= 1
    # a later full collection walks only what was made since
    gc.collect()
    assert gc.get_freeze_count() >= len(kept)


def test_a_full_collection_that_freed_cycles_freezes_nothing(
        watching: None, caplog: pytest.LogCaptureFixture) -> None:
    gc.disable()  # no automatic collection (which freezes, freeing little) meanwhile
    try:
        for _ in range(5000):  # garbage only a collection frees
            a: list[object] = []
            a.append(a)
        del a
        caplog.set_level(logging.WARNING, "fusedisk.gcwatch")
        gc.collect()
    finally:
        gc.enable()
    assert gc.get_freeze_count() == 0
    assert "garbage collection of generation 2" in caplog.text
    assert "survivors are frozen" not in caplog.text


def test_a_fast_full_collection_that_freed_nothing_freezes_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only slow ones: else every full collection between two slow ones walks
    all that was made since the last freeze (100k files: 52-448 ms each)."""
    monkeypatch.setattr(gcwatch, "SLOW_MS", 1e9)  # no collection counts as slow
    gcwatch.install()
    gc.unfreeze()
    try:
        kept = [[i] for i in range(2000)]
        gc.collect()
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.callbacks.remove(gcwatch._watch)
        gc.unfreeze()
