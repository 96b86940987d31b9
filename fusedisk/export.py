"""``fusedisk export``: a file of a mounted datastore as a read-only NBD export.

The export process is a client of the mount like any backup tool: it reads
the file through the mountpoint, and asks the daemon (control socket) for
the file's allocated extents (``base:allocation``) and, with ``--since
ID``, for the extents changed since that change id, served as the meta
context ``qemu:dirty-bitmap:ID``. Both maps are taken once, when the export
starts. ``FILE@SNAPSHOT`` reads the file in the mount's view of that
snapshot (``MNT/.snapshots/ENTRY@NAME/...``, snapview.py), a point in time
that no write of the guest changes; its allocation comes from that file
(``SEEK_DATA``/``SEEK_HOLE`` through the mount). A plain ``FILE`` reads the
live file: a backup of a file that is written meanwhile is not a point in
time (take a snapshot, or stop the guest first).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import trio

from . import api, backing, control, nbd
from .errors import FusediskError

log = logging.getLogger(__name__)


def parse_tcp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FusediskError(f"--tcp {text!r}: expected HOST:PORT, e.g. 127.0.0.1:10809")
    return host.strip("[]"), int(port)


def _extents(changes: api.Changes) -> list[tuple[int, int]]:
    return [(int(offset), int(length)) for offset, length in changes.extents]


def run(mountpoint: Path, relative: str, since: str | None, unix_socket: Path | None,
        tcp: tuple[str, int] | None, name: str,
        snapshot: dict[str, Any] | None = None, tls: ssl.SSLContext | None = None) -> int:
    """Serve *relative* (a path inside the mount), or its copy in *snapshot* (its record:
    ``path`` in the mount's view of snapshots, ``change_id``), until SIGINT/SIGTERM;
    the URI goes to stdout once clients can connect."""
    bitmaps: dict[str, nbd.Extents] = {}
    if since is not None:
        until = snapshot["change_id"] if snapshot is not None else None
        bitmaps[since] = _extents(control.call(mountpoint, api.CbtChanges(
            path=relative, since=since, until=until)))
    where = Path(snapshot["path"]) if snapshot is not None else mountpoint / relative
    try:
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise FusediskError(f"cannot open {relative} on {mountpoint}: {e.strerror}") from None
    try:
        if snapshot is not None:  # nothing writes a snapshot: its holes are its own
            allocated = backing.data_extents(fd)
        else:
            allocated = _extents(control.call(mountpoint,
                                              api.CbtChanges(path=relative, since="*")))
        export = nbd.file_export(name or relative, fd, allocated, bitmaps)
        trio.run(_serve, export, unix_socket, tcp, tls)
    finally:
        os.close(fd)
    return 0


async def _serve(export: nbd.Export, unix_socket: Path | None,
                 tcp: tuple[str, int] | None, tls: ssl.SSLContext | None) -> None:
    server = nbd.Server([export], tls)
    scheme = "nbds" if tls is not None else "nbd"
    listeners: list[trio.SocketListener] = []
    if unix_socket is not None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(unix_socket))
        except OSError as e:
            sock.close()
            raise FusediskError(f"cannot listen on {unix_socket}: {e.strerror}") from None
        sock.listen(nbd.MAX_CLIENTS)
        listeners.append(trio.SocketListener(sock))
        uri = f"{scheme}+unix:///{export.name}?socket={unix_socket}"
    else:
        assert tcp is not None
        try:
            listeners = await trio.open_tcp_listeners(tcp[1], host=tcp[0])
        except OSError as e:
            raise FusediskError(f"cannot listen on {tcp[0]}:{tcp[1]}: {e.strerror}") from None
        uri = f"{scheme}://{tcp[0]}:{tcp[1]}/{export.name}"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            contexts = ", ".join(export.contexts())
            print(uri, flush=True)
            tls_note = "; TLS with a pre-shared key required" if tls is not None else ""
            print(f"fusedisk: exporting {export.name} ({export.size} bytes, read-only; "
                  f"meta contexts: {contexts}{tls_note}); Ctrl-C ends it", file=sys.stderr,
                  flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        if unix_socket is not None:
            os.unlink(unix_socket)
    s = server.statistics
    print(f"fusedisk: export ended: {s.connections} connection(s), {s.requests} request(s), "
          f"{s.bytes_read} bytes read, {s.protocol_errors} protocol error(s)",
          file=sys.stderr, flush=True)
