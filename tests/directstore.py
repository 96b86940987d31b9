"""A real datastore on temp directories with its daemon services, and no mount.

The rooms below the FUSE edge, as the daemon composes them (datastore,
open files with CBT, Operations for the switchover's re-point, the
relocator, the control commands), driven by direct calls, so that a test
can run real relocations on trio's autojump clock and call the control
handlers as the socket would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from fusedisk.cbt import CbtStore
from fusedisk.commands import Commands
from fusedisk.config import Config, build_config
from fusedisk.datastore import Datastore, StoreClaims
from fusedisk.fs import Operations
from fusedisk.metadata import StateDir
from fusedisk.relocation import Relocator
from fusedisk.snapshots import Snapshots
from fusedisk.vdisk import OpenFiles


def store_config(tmp_path: Path, stores: tuple[str, ...] = ("a", "b")) -> Config:
    """The configuration of a datastore of *stores* under *tmp_path* (created)."""
    for name in stores:
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "mnt").mkdir(exist_ok=True)
    return build_config(config_file=None, mountpoint=str(tmp_path / "mnt"),
                        stores=[f"{n}={tmp_path / n}" for n in stores], default_store=stores[0],
                        state_dir=str(tmp_path / "state"), block_size=None, allow_other=None)


@contextlib.contextmanager
def opened(config: Config) -> Iterator[Datastore]:
    """Datastore.open as a mount does it (state directory, store claims); closed after."""
    state = StateDir(config.state_dir)
    state.open()
    claims = StoreClaims(state, config.mountpoint)
    try:
        datastore = Datastore.open(config, state, claims)
        try:
            yield datastore
        finally:
            datastore.close()
    finally:
        claims.release()
        state.close()


@dataclass
class Rig:
    config: Config
    datastore: Datastore
    files: OpenFiles
    relocator: Relocator
    commands: Commands


@contextlib.asynccontextmanager
async def services(config: Config) -> AsyncIterator[Rig]:
    """The datastore of *config* with the daemon's services running (no mount)."""
    with opened(config) as datastore:
        cbt = CbtStore(config.state_dir, config.block_size)
        files = OpenFiles(cbt, config.block_size)
        ops = Operations(datastore, files)
        relocator = Relocator(datastore, files, config.block_size, ops.repoint)
        commands = Commands(
            mountpoint=config.mountpoint, state_dir=config.state_dir, datastore_id="direct",
            block_size=config.block_size, cbt_enabled=True, datastore=datastore, files=files,
            relocator=relocator, snapshots=Snapshots(datastore, files), extra_status=dict)
        umask = os.umask(0)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(files.run)
                await nursery.start(relocator.run)
                yield Rig(config, datastore, files, relocator, commands)
                await relocator.stop()
                nursery.cancel_scope.cancel()
        finally:
            os.umask(umask)
            ops.close()
