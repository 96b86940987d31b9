"""The persisted progress of a relocation: what a resumed one may keep.

A relocation saves a *progress record* in its staging directory on the
destination store (``<staging>/progress``, crc-checked, atomic replace) so
that a crash, a restart or a clean stop resumes the copy instead of starting
over. For each file worth keeping (see :data:`KEEP_MIN_BYTES`) it lists:

- the source's backing key and CBT file id (the file's identity: a file
  deleted, replaced or given a new history is copied afresh);
- the destination file's inode number on the destination store (resume
  finds it wherever the staged tree has moved it);
- ``pending``: the blocks still to copy when the record was made (the copy's
  dirty bitmap, taken in the same step as the generation below started).

and one *generation* number: the relocation mark (cbt.py) each file's CBT
history started at the same instant. Protocol of one save (relocation.py):

1. snapshot every file's pending blocks and start generation *n* of its
   relocation mark, with no checkpoint in between;
2. save every file's CBT history (generation *n* is durable);
3. fsync the destination files (every block not pending is durable);
4. write this record (fsynced, then the directory);
5. forget the generations before *n*.

So at any instant the record on disk names a generation that every listed
file's saved CBT history holds (or a newer record does), and what changed
since the record was made is in that generation, after a crash too (the
activity log's regions are folded into it: a superset, larger by at most the
log's window). A resumed copy copies ``pending ∪ generation`` and keeps the
rest of the destination file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bitmap import Bitmap
from .errors import StateError
from .metadata import atomic_write, decode_record, encode_record

NAME = "progress"
_KIND = "relocation-progress"
#: Files with less data than this are not listed: copying them again costs
#: less than saving their CBT history at every progress save.
KEEP_MIN_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class FileProgress:
    src_key: tuple[int, int]
    file_id: str
    dst_ino: int
    pending: Bitmap


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress record (see the module doc)."""

    gen: int
    block_size: int
    src_store: str
    dst_store: str
    files: dict[tuple[int, int], FileProgress]

    def to_record(self) -> dict[str, Any]:
        return {
            "gen": self.gen, "block_size": self.block_size,
            "from": self.src_store, "to": self.dst_store,
            "files": [{"src_key": list(f.src_key), "file_id": f.file_id, "dst_ino": f.dst_ino,
                       "pending": f.pending.to_record()} for f in self.files.values()],
        }

    @classmethod
    def from_record(cls, body: dict[str, Any]) -> Progress:
        try:
            files = {}
            for item in body["files"]:
                dev, ino = item["src_key"]
                key = (int(dev), int(ino))
                files[key] = FileProgress(key, str(item["file_id"]), int(item["dst_ino"]),
                                          Bitmap.from_record(item["pending"]))
            return cls(int(body["gen"]), int(body["block_size"]), str(body["from"]),
                       str(body["to"]), files)
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"malformed relocation progress record: {e}") from None


def save(staging: Path, progress: Progress) -> None:
    """Write the record durably (step 4 of the module doc). Blocking."""
    atomic_write(staging, NAME, encode_record(_KIND, progress.to_record()))


def load(staging: Path) -> Progress | None:
    """The record in *staging*, or None if there is none. Raises StateError if
    it cannot be trusted. Blocking."""
    try:
        data = (staging / NAME).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Progress.from_record(decode_record(_KIND, data, str(staging / NAME)))

