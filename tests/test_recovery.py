"""The datastore's crash recovery, case by case: each persisted phase × what is on disk.

Level: Datastore.open on real temp directories (no mount, no daemon). Each
case writes a datastore record with one relocation of ``vm1`` from store
``a`` to store ``b`` in a phase (lifecycle.Phase), lays out what a crash may
have left (the staged tree, the source, the destination's copy, an older
kept-aside copy, the progress record), opens the datastore and checks what
recovery did: which copy is served, what was removed, what the record still
says, and what the log reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusedisk import progress
from fusedisk.datastore import kept_source_name, staging_name
from fusedisk.lifecycle import Phase
from fusedisk.metadata import StateDir

from .directstore import opened, store_config

STAGING = staging_name("vm1")
KEPT = kept_source_name("vm1")


@dataclass(frozen=True)
class Case:
    phase: str  #: as the record holds it (a Phase, or something else)
    staged: bool  #: b holds the staged tree (staging/tree/disk.img = "staged")
    source: bool  #: a holds vm1 (disk.img = "source")
    dest: bool  #: b holds vm1 (disk.img = "dest")
    keep_source: bool = False
    old_kept: bool = False  #: a holds an older kept-aside copy
    progress: bool = False  #: the staging directory holds a progress record
    # what recovery must do
    served: str | None = "a"  #: the store serving vm1 (None: not served)
    content: bytes = b"source"  #: what vm1/disk.img then holds
    left: frozenset[str] = frozenset()  #: what remains besides the served copy
    record: str | None = None  #: the phase the record keeps (None: ended)
    resumable: bool = False
    logged: str = ""


CASES = {
    # copying: the source is the truth; the partial copy stays for the resume
    "copying, staged, source": Case(str(Phase.COPYING), True, True, False, record="copying",
                                    resumable=True, left=frozenset({"b/staging"}),
                                    logged="it resumes from what 'b' holds"),
    "copying, staged with progress": Case(str(Phase.COPYING), True, True, False,
                                          progress=True, record="copying", resumable=True,
                                          left=frozenset({"b/staging"}),
                                          logged="it resumes"),
    "copying, nothing staged": Case(str(Phase.COPYING), False, True, False, record="copying",
                                    resumable=True, logged="it resumes"),
    "copying, source gone": Case(str(Phase.COPYING), True, False, False, served=None,
                                 logged="the partial copy was removed"),
    "copying, keep_source": Case(str(Phase.COPYING), True, True, False, keep_source=True,
                                 record="copying", resumable=True,
                                 left=frozenset({"b/staging"}), logged="it resumes"),
    # committed: the destination is the truth; finish the switch
    "committed, staged, source": Case(str(Phase.COMMITTED), True, True, False, served="b",
                                      content=b"staged", logged="finished it"),
    "committed, renamed, source": Case(str(Phase.COMMITTED), False, True, True, served="b",
                                       content=b"dest", logged="finished it"),
    "committed, renamed, source gone": Case(str(Phase.COMMITTED), False, False, True,
                                            served="b", content=b"dest", logged="finished it"),
    "committed, keep_source": Case(str(Phase.COMMITTED), True, True, False, keep_source=True,
                                   served="b", content=b"staged", left=frozenset({"a/kept"}),
                                   logged="finished it"),
    "committed, keep_source over an old kept copy": Case(
        str(Phase.COMMITTED), True, True, False, keep_source=True, old_kept=True, served="b",
        content=b"staged", left=frozenset({"a/kept"}), logged="finished it"),
    # the destination lost both the staged tree and the renamed copy (a store
    # not mounted, or restored from an old backup): the source is all there is,
    # and stays (this removed it once: the only copy)
    "committed, destination lost": Case(str(Phase.COMMITTED), False, True, False,
                                        logged="neither the staged tree nor"),
    # abandoned (failed or cancelled) and anything unknown: remove the partial copy
    "abandoned, staged": Case(str(Phase.ABANDONED), True, True, False,
                              logged="the partial copy was removed"),
    "abandoned, nothing staged": Case(str(Phase.ABANDONED), False, True, False,
                                      logged="the partial copy was removed"),
    "abandoned, staged with progress": Case(str(Phase.ABANDONED), True, True, False,
                                            progress=True, logged="the partial copy was removed"),
    "unknown phase": Case("switching", True, True, False, logged="the partial copy was removed"),
}


def _disk(path: Path, content: bytes) -> None:
    path.mkdir(parents=True)
    (path / "disk.img").write_bytes(content)


def _lay_out(tmp_path: Path, case: Case) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    if case.source:
        _disk(a / "vm1", b"source")
    if case.dest:
        _disk(b / "vm1", b"dest")
    if case.staged:
        _disk(b / STAGING / "tree", b"staged")
        (b / STAGING / "pool").mkdir()
    if case.progress:
        (b / STAGING).mkdir(exist_ok=True)
        progress.save(b / STAGING, progress.Progress(3, 65536, "a", "b", {}))
    if case.old_kept:
        _disk(a / KEPT, b"older")


def _write_record(state_dir: Path, case: Case) -> None:
    state = StateDir(state_dir)
    state.open()
    try:
        record = state.load("datastore")
        assert record is not None
        record["placement"] = {"vm1": "a"}
        record["relocations"] = {"vm1": {"from": "a", "to": "b", "phase": case.phase,
                                         "keep_source": case.keep_source,
                                         "options": {"rate": 0}}}
        state.save("datastore", record)
    finally:
        state.close()


def _left(tmp_path: Path, served: str | None) -> set[str]:
    found = set()
    for store in ("a", "b"):
        names = {p.name for p in (tmp_path / store).iterdir()} - {".fusedisk-owner"}
        if "vm1" in names and store != served:
            found.add(f"{store}/vm1")
        if STAGING in names:
            found.add(f"{store}/staging")
        if KEPT in names:
            found.add(f"{store}/kept")
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_recovery(tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str) -> None:
    case = CASES[name]
    config = store_config(tmp_path)
    with opened(config):
        pass  # the state directory and the stores' ids, as a first mount leaves them
    _lay_out(tmp_path, case)
    _write_record(config.state_dir, case)
    caplog.set_level(logging.INFO, logger="fusedisk")
    with opened(config) as datastore:
        entry = datastore.get("vm1")
        assert (entry.store.name if entry else None) == case.served, name
        if case.served is not None:
            served = tmp_path / case.served / "vm1" / "disk.img"
            assert served.read_bytes() == case.content, name
        reloc = datastore.relocations.get("vm1")
        assert (reloc["phase"] if reloc else None) == case.record, name
        assert ("vm1" in datastore.resumable) == case.resumable, name
        assert datastore.relocating("vm1") == (case.record is not None), name
        assert _left(tmp_path, case.served) == set(case.left), name
        if "a/kept" in case.left:
            assert (tmp_path / "a" / KEPT / "disk.img").read_bytes() == b"source"
        if case.progress and case.resumable:
            assert progress.load(tmp_path / "b" / STAGING) is not None  # kept for the resume
    assert case.logged in caplog.text, (name, caplog.text)
    # what was saved is what the next mount starts from: open again, nothing changes
    caplog.clear()
    with opened(config) as again:
        entry = again.get("vm1")
        assert (entry.store.name if entry else None) == case.served
        assert _left(tmp_path, case.served) == set(case.left), name
