"""fs.Operations called directly (no kernel, no mount) against a plain directory.

The level between unit tests and a real mount: the FUSE handlers run on a
trio loop on a real datastore (stores and state directory on disk), driven
by a random sequence of namespace and data operations, and every outcome
(success, or the errno) and the whole tree afterwards are compared with the
same operations on a reference directory. What fusedisk refuses on purpose
(hard links and renames across entries, moves into or out of the top
level) is the model's only deviation from the reference. A failure here
points at fs.py or the rooms below it, not at the kernel or the loop.

Only ``pyfuse3.readdir_reply`` (which needs a kernel request) is replaced:
by a collector, so that readdir's own code still runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyfuse3
import pytest
import trio

from fusedisk.cbt import CbtStore
from fusedisk.config import build_config
from fusedisk.datastore import Datastore, StoreClaims
from fusedisk.fs import Operations
from fusedisk.metadata import StateDir
from fusedisk.vdisk import OpenFiles

ROOT = pyfuse3.ROOT_INODE
CTX = pyfuse3.RequestContext()  # uid 0, gid 0: the daemon runs as root
SEEDS = range(8)
STEPS = 300


@dataclass(frozen=True)
class Fields:
    """What a SETATTR asks to change (pyfuse3's SetattrFields cannot be made in Python)."""

    update_size: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False

    def as_pyfuse3(self) -> pyfuse3.SetattrFields:
        return cast(pyfuse3.SetattrFields, self)


class Harness:
    """Operations on a datastore with one store, and path-level helpers over it."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self._held: list[int] = []

    async def resolve(self, parts: tuple[str, ...]) -> int:
        """The inode of *parts*. As the kernel does, every lookup is held until the
        operation that needed it is over (:meth:`forget_held`)."""
        ino = ROOT
        for part in parts:
            attr = await self.ops.lookup(ino, os.fsencode(part), CTX)
            self._held.append(attr.st_ino)
            ino = attr.st_ino
        return ino

    async def forget_held(self) -> None:
        held, self._held = self._held, []
        await self.ops.forget([(ino, 1) for ino in held])

    async def listdir(self, ino: int) -> list[str]:
        names: list[str] = []

        def collect(token: Any, name: bytes, attr: Any, next_id: int) -> bool:
            names.append(os.fsdecode(name))
            forgotten.append(attr.st_ino)
            return True

        forgotten: list[int] = []
        real = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = collect
        try:
            fh = await self.ops.opendir(ino, CTX)
            try:
                await self.ops.readdir(fh, 0, None)  # type: ignore[arg-type]
            finally:
                await self.ops.releasedir(fh)
        finally:
            pyfuse3.readdir_reply = real
        await self.ops.forget([(i, 1) for i in forgotten])
        return sorted(names)

    async def read_all(self, ino: int) -> bytes:
        info = await self.ops.open(ino, os.O_RDONLY, CTX)
        try:
            out = b""
            while chunk := await self.ops.read(info.fh, len(out), 1 << 20):
                out += chunk
            return out
        finally:
            await self.ops.release(info.fh)

    async def describe(self, ino: int = ROOT, prefix: str = "") -> dict[str, object]:
        """Path → (type, mode, size, nlink, body, user xattrs), as the handlers show it.
        Each child's lookup is held while it (and what is below it) is described."""
        out: dict[str, object] = {}
        for name in await self.listdir(ino):
            path = f"{prefix}{name}"
            attr = await self.ops.lookup(ino, os.fsencode(name), CTX)
            try:
                out[path] = await self._describe_one(attr)
                if stat.S_ISDIR(attr.st_mode):
                    out.update(await self.describe(attr.st_ino, f"{path}/"))
            finally:
                await self.ops.forget([(attr.st_ino, 1)])
        return out

    async def _describe_one(self, attr: pyfuse3.EntryAttributes) -> object:
        kind = stat.S_IFMT(attr.st_mode)
        body: object = None
        if kind == stat.S_IFREG:
            body = await self.read_all(attr.st_ino)
        elif kind == stat.S_IFLNK:
            body = os.fsdecode(await self.ops.readlink(attr.st_ino, CTX))
        xattrs = {}
        if kind != stat.S_IFLNK:
            for key in await self.ops.listxattr(attr.st_ino, CTX):
                if key.startswith(b"user."):
                    xattrs[os.fsdecode(key)] = await self.ops.getxattr(attr.st_ino, key, CTX)
        return (kind, stat.S_IMODE(attr.st_mode),
                attr.st_size if kind == stat.S_IFREG else None,
                attr.st_nlink if kind != stat.S_IFDIR else None, body, xattrs)


def describe_reference(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            body: object = None
            if kind == stat.S_IFREG:
                body = path.read_bytes()
            elif kind == stat.S_IFLNK:
                body = os.readlink(path)
            xattrs = {} if kind == stat.S_IFLNK else {
                a: os.getxattr(path, a) for a in os.listxattr(path) if a.startswith("user.")}
            out[str(path.relative_to(root))] = (
                kind, stat.S_IMODE(st.st_mode), st.st_size if kind == stat.S_IFREG else None,
                st.st_nlink if kind != stat.S_IFDIR else None, body, xattrs)
    return out


@contextlib.contextmanager
def unmounted_ops(tmp_path: Path, *, cbt: bool = False) -> Iterator[Operations]:
    """A real datastore (store and state directory on disk; CBT on with *cbt*) and
    its Operations, unmounted, with umask 0 as the daemon runs."""
    store = tmp_path / "store"
    store.mkdir()
    config = build_config(config_file=None, mountpoint=str(tmp_path / "mnt"),
                          stores=[f"a={store}"], default_store="a",
                          state_dir=str(tmp_path / "state"), block_size=None,
                          allow_other=None)
    (tmp_path / "mnt").mkdir()
    state = StateDir(config.state_dir)
    state.open()
    claims = StoreClaims(state, config.mountpoint)
    datastore = Datastore.open(config, state, claims)
    files = OpenFiles(CbtStore(config.state_dir, config.block_size) if cbt else None,
                      config.block_size)
    ops = Operations(datastore, files)
    umask = os.umask(0)  # as the daemon runs: modes are exactly what is asked for
    try:
        yield ops
    finally:
        os.umask(umask)
        ops.close()
        datastore.close()
        claims.release()
        state.close()


@contextlib.asynccontextmanager
async def datastore_ops(tmp_path: Path) -> AsyncIterator[Harness]:
    """:func:`unmounted_ops` with its files' service running, as a :class:`Harness`."""
    with unmounted_ops(tmp_path) as ops:
        async with trio.open_nursery() as nursery:
            await nursery.start(ops.files.run)
            yield Harness(ops)
            nursery.cancel_scope.cancel()


def _errno(e: BaseException) -> int:
    if isinstance(e, pyfuse3.FUSEError):
        return e.errno
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    raise e


async def _outcome(call: Callable[[], Awaitable[object]]) -> int:
    try:
        await call()
    except (OSError, pyfuse3.FUSEError) as e:
        return _errno(e)
    return 0


def _reference_outcome(call: Callable[[], object]) -> int:
    try:
        call()
    except OSError as e:
        return e.errno or -1
    return 0


def _reference_paths(ref: Path) -> list[str]:
    return sorted(str(p.relative_to(ref)) for p in ref.rglob("*"))


async def run_case(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    ref = tmp_path / "ref"
    ref.mkdir()
    async with datastore_ops(tmp_path) as h:
        for step in range(STEPS):
            await one_step(h, ref, rng, seed, step)


async def one_step(h: Harness, ref: Path, rng: random.Random, seed: int, step: int) -> None:
    """One random operation on both sides; every 25 steps, the two trees compared."""
    ops = h.ops
    paths = _reference_paths(ref)
    kinds = {p: stat.S_IFMT(os.lstat(ref / p).st_mode) for p in paths}
    dirs = [""] + [p for p in paths if kinds[p] == stat.S_IFDIR]
    parent = rng.choice(dirs)
    name = rng.choice(["a", "b", "c", f"n{step}"])
    new = f"{parent}/{name}".lstrip("/")
    pick = rng.choice(paths) if paths else new
    # (with nothing there yet: only what makes something, mkdir or write)
    roll = rng.random() if paths else rng.random() * 0.35
    expected_refusal = 0  # fusedisk's own rule, where the reference would go on

    def parts(path: str) -> tuple[str, ...]:
        return tuple(path.split("/")) if path else ()

    async def under(path: str) -> tuple[int, bytes]:
        p = parts(path)
        return await h.resolve(p[:-1]), os.fsencode(p[-1])

    def entry_of(path: str) -> str:
        return path.split("/")[0]

    if roll < 0.15:
        what = f"mkdir {new}"
        mode = rng.choice((0o755, 0o700, 0o2775))

        def ref_call() -> None:
            os.mkdir(ref / new, mode)  # umask 0 (see datastore_ops)

        async def ops_call() -> None:
            p, n = await under(new)
            # the kernel strips S_ISGID from mkdir's mode before asking (vfs_mkdir)
            await ops.mkdir(p, n, stat.S_IFDIR | (mode & 0o1777), CTX)
    elif roll < 0.35:
        what = f"write {pick if rng.random() < 0.5 else new}"
        target = what.split(" ", 1)[1]
        offset = rng.choice((0, 1, 4095, 65536, rng.randrange(200000)))
        data = rng.randbytes(rng.choice((1, 100, 4096, 70000)))
        truncate = rng.random() < 0.2

        def ref_call() -> None:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
            fd = os.open(ref / target, flags | os.O_NOFOLLOW, 0o644)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        async def ops_call() -> None:
            p, n = await under(target)
            try:
                attr = await ops.lookup(p, n, CTX)
            except pyfuse3.FUSEError as e:
                if e.errno != errno.ENOENT:
                    raise
                info, attr = await ops.create(p, n, stat.S_IFREG | 0o644,
                                              os.O_WRONLY, CTX)
            else:
                if stat.S_ISLNK(attr.st_mode):
                    raise OSError(errno.ELOOP, "O_NOFOLLOW")  # as the kernel refuses
                flags = os.O_WRONLY | (os.O_TRUNC if truncate else 0)
                info = await ops.open(attr.st_ino, flags, CTX)
            await ops.forget([(attr.st_ino, 1)])
            try:
                await ops.write(info.fh, offset, data)
            finally:
                await ops.release(info.fh)
    elif roll < 0.42:
        what = f"truncate {pick}"
        size = rng.choice((0, 1, 5000, 300000))

        if kinds.get(pick) != stat.S_IFREG:
            return  # the kernel follows symlinks and refuses directories itself

        def ref_call() -> None:
            os.truncate(ref / pick, size)

        async def ops_call() -> None:
            attr = pyfuse3.EntryAttributes()
            attr.st_size = size
            fields = Fields(update_size=True)
            node = await h.resolve(parts(pick))
            await ops.setattr(node, attr, fields.as_pyfuse3(), None, CTX)
    elif roll < 0.50:
        what = f"chmod {pick}"
        mode = rng.choice((0o600, 0o644, 0o755, 0o4755, 0o1777))

        def ref_call() -> None:
            os.chmod(ref / pick, mode, follow_symlinks=False)

        async def ops_call() -> None:
            attr = pyfuse3.EntryAttributes()
            attr.st_mode = mode
            fields = Fields(update_mode=True)
            node = await h.resolve(parts(pick))
            await ops.setattr(node, attr, fields.as_pyfuse3(), None, CTX)
        if kinds.get(pick) == stat.S_IFLNK:
            return  # Linux has no lchmod; the kernel never asks for one
    elif roll < 0.58:
        what = f"unlink/rmdir {pick}"
        is_dir = kinds.get(pick) == stat.S_IFDIR

        def ref_call() -> None:
            (os.rmdir if is_dir else os.unlink)(ref / pick)

        async def ops_call() -> None:
            p, n = await under(pick)
            await (ops.rmdir if is_dir else ops.unlink)(p, n, CTX)
    elif roll < 0.72:
        target = new if rng.random() < 0.6 else rng.choice(paths or [new])
        flags = rng.choice((0, 0, pyfuse3.RENAME_NOREPLACE, pyfuse3.RENAME_EXCHANGE))
        what = f"rename {pick} -> {target} flags {flags}"
        top_a, top_b = "/" not in pick, "/" not in target
        if top_a != top_b or (not top_a and entry_of(pick) != entry_of(target)):
            expected_refusal = errno.EXDEV

        def ref_call() -> None:
            fd = os.open(ref, os.O_PATH)
            try:
                from fusedisk import backing
                backing.renameat2(fd, pick, fd, target, flags)
            finally:
                os.close(fd)

        async def ops_call() -> None:
            pa, na = await under(pick)
            pb, nb = await under(target)
            await ops.rename(pa, na, pb, nb, flags, CTX)
    elif roll < 0.80:
        what = f"link {pick} -> {new}"
        if entry_of(pick) != entry_of(new) or "/" not in new or "/" not in pick:
            expected_refusal = errno.EXDEV
        if kinds.get(pick) == stat.S_IFDIR:
            return  # the kernel refuses a link to a directory itself (EPERM)

        def ref_call() -> None:
            os.link(ref / pick, ref / new, follow_symlinks=False)

        async def ops_call() -> None:
            node = await h.resolve(parts(pick))
            p, n = await under(new)
            attr = await ops.link(node, p, n, CTX)
            await ops.forget([(attr.st_ino, 1)])
    elif roll < 0.88:
        what = f"symlink {new}"
        link_target = rng.choice(("a", "../b", "/etc/passwd", "x" * 300))

        def ref_call() -> None:
            os.symlink(link_target, ref / new)

        async def ops_call() -> None:
            p, n = await under(new)
            attr = await ops.symlink(p, n, os.fsencode(link_target), CTX)
            await ops.forget([(attr.st_ino, 1)])
    else:
        what = f"setxattr {pick}"
        key, value = f"user.k{rng.randrange(3)}", rng.randbytes(rng.randrange(1, 40))
        if kinds.get(pick) == stat.S_IFLNK:
            return  # user.* xattrs on symlinks: refused by Linux, and by fusedisk

        def ref_call() -> None:
            os.setxattr(ref / pick, key, value, follow_symlinks=False)

        async def ops_call() -> None:
            node = await h.resolve(parts(pick))
            await ops.setxattr(node, os.fsencode(key), value, CTX)

    got = await _outcome(ops_call)
    await h.forget_held()
    if expected_refusal:
        assert got == expected_refusal, (seed, step, what, errno.errorcode.get(got))
        return
    want = _reference_outcome(ref_call)
    assert got == want, (seed, step, what, errno.errorcode.get(got),
                         errno.errorcode.get(want))
    if step % 25 == 0 or step == STEPS - 1:
        assert await h.describe() == describe_reference(ref), (seed, step, what)


@pytest.mark.parametrize("seed", SEEDS)
async def test_operations_match_a_plain_directory(tmp_path: Path, seed: int) -> None:
    await run_case(tmp_path, seed)
