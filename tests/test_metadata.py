"""State records: versioned, checksummed, atomically replaced, locked."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusedisk import metadata
from fusedisk.errors import StateError
from fusedisk.metadata import StateDir, decode_record, encode_record


def test_round_trip_and_every_kind_of_damage(tmp_path: Path) -> None:
    data = encode_record("datastore", {"placement": {"web01": "a"}})
    assert decode_record("datastore", data, "x") == {"placement": {"web01": "a"}}
    with pytest.raises(StateError, match="holds a 'datastore' record"):
        decode_record("cbt-al", data, "x")
    flipped = bytearray(data)
    flipped[-2] ^= 1
    with pytest.raises(StateError, match="checksum"):
        decode_record("datastore", bytes(flipped), "x")
    with pytest.raises(StateError, match="checksum"):
        decode_record("datastore", data[:-1], "x")  # torn
    with pytest.raises(StateError, match="not a fusedisk state file"):
        decode_record("datastore", b"PK\x03\x04 zip", "x")
    newer = data.replace(b" v1 ", b" v9 ", 1)
    with pytest.raises(StateError, match="newer fusedisk"):
        decode_record("datastore", newer, "x")


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.open()
    try:
        assert state.load("datastore") is None
        state.save("datastore", {"n": 1})
        state.save("datastore", {"n": 2})
        assert state.load("datastore") == {"n": 2}
        assert sorted(p.name for p in state.path.iterdir()) == ["datastore.state", "lock"]
    finally:
        state.close()


def test_one_daemon_per_state_directory(tmp_path: Path) -> None:
    first, second = StateDir(tmp_path), StateDir(tmp_path)
    first.open()
    try:
        with pytest.raises(StateError, match="in use by another fusedisk daemon"):
            second.open()
    finally:
        first.close()
    second.open()  # a released (or crashed) holder never blocks the next one
    second.close()


def test_format_version_is_written(tmp_path: Path) -> None:
    header = encode_record("datastore", {}).split(b"\n", 1)[0]
    assert f" v{metadata.FORMAT_VERSION} ".encode() in header


def test_slotted_records_survive_a_torn_write(tmp_path: Path) -> None:
    path = tmp_path / "log"
    assert metadata.read_slotted(path, "cbt-al", 4096) is None
    metadata.write_slotted(path, "cbt-al", 1, {"regions": [1]}, 4096)
    metadata.write_slotted(path, "cbt-al", 2, {"regions": [1, 2]}, 4096)
    assert metadata.read_slotted(path, "cbt-al", 4096) == (2, {"seq": 2, "regions": [1, 2]})
    data = bytearray(path.read_bytes())
    data[0 * 4096 + 60] ^= 0xFF  # tear the newest record (seq 2 lives in slot 0)
    path.write_bytes(bytes(data))
    assert metadata.read_slotted(path, "cbt-al", 4096) == (1, {"seq": 1, "regions": [1]})
    data[1 * 4096 + 60] ^= 0xFF  # and the older one
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="no valid record"):
        metadata.read_slotted(path, "cbt-al", 4096)
