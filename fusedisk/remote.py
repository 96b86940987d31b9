"""Remote stores: a store directory on another host, reached over NBD and an agent.

A store spec ``NAME=nbd+ssh://[user@]host[:sshport]/DIR`` names a directory on
another host; ``NAME=nbd+local:///DIR`` is the same with the agent and
nbdkit run as local commands instead of over ssh (tests, and hosts without
ssh). Options follow as a query (``?tls-psk=FILE&...``, see :data:`OPTIONS`).

On the remote side two programs do the work: ``fusedisk store-agent DIR``
(agent.py: the namespace, attributes, fsync, small files; JSON lines on its
stdio, which ssh carries) and nbdkit's ``file`` plugin on DIR with TLS-PSK,
which the agent starts on request (``serve``) and which carries the disk
data: one export per top-level file of DIR. On this side the data path is
libnbd: :func:`copy_file_to` copies a local file into an export with several
connections and several requests in flight on each, driven by libnbd's
asynchronous API under trio, holes skipped (``SEEK_DATA``/``SEEK_HOLE``),
and ends with an NBD flush on every connection.

What exists (issue 17, milestones 1-2): the spec, the up-front check
(:func:`connect`: agent started, version handshake, nbdkit started, a TLS-PSK
connection made by libnbd) and the copy. nbdfile.py serves one export's data
to many trio tasks (reads, writes, flush, reconnects) on top of this
module's handles and :func:`_wait`. Serving entries from a remote store
and relocating onto one are not built: ``mount`` checks a remote store and
then refuses, saying so.

libnbd's Python module is Debian's ``python3-libnbd``, installed for the
system's Python; a venv on a Python of the same minor version loads the
module's two files from there (:func:`libnbd`), nothing else of that tree.
The local reads of the copy stay on the trio loop: a 1 MiB ``pread`` from a
file in the page cache costs less than a hop to a worker thread
(PERF-NOTES.md: ~180 µs), and the sockets are waited on without blocking.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import trio

from . import __version__, tlspsk
from .agent import PROTOCOL_VERSION
from .errors import ConfigError, FusediskError

#: The key file both ends read when the spec names none.
DEFAULT_PSK = "/etc/fusedisk/nbd.psk"
#: The TCP port nbdkit listens on, on a remote host reached over ssh.
DEFAULT_NBD_PORT = 10809
DEFAULT_CONNECT_TIMEOUT_S = 30.0
#: Query options of a spec; the last two may repeat.
OPTIONS = ("tls-psk", "tls-username", "remote-tls-psk", "nbd-port", "agent",
           "connect-timeout", "ssh-config", "nbdkit-filter", "nbdkit-param")
_REPEATABLE = {"nbdkit-filter", "nbdkit-param"}
_SCHEMES = ("nbd+ssh", "nbd+local")

_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")


class RemoteError(FusediskError):
    """A remote store cannot be reached, speaks another version, or failed mid-operation."""


class StoreBusy(RemoteError):
    """The remote store is claimed by another datastore (agent.py ``Agent._claim``)."""


def is_remote_spec(text: str) -> bool:
    """Whether a store's directory text is a remote spec (``nbd+...://``)."""
    return text.startswith("nbd+")


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """A parsed remote store spec; :func:`parse_spec` builds it."""

    name: str
    text: str
    transport: str  # "ssh" or "local"
    directory: str  # absolute, on the remote host
    host: str = ""
    user: str = ""
    ssh_port: int = 0
    tls_psk: Path = Path(DEFAULT_PSK)
    tls_username: str = ""
    remote_tls_psk: str = DEFAULT_PSK
    nbd_port: int = DEFAULT_NBD_PORT
    agent: tuple[str, ...] = ()
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    #: an ssh client configuration file (``ssh -F``) instead of the user's own
    ssh_config: str = ""
    nbdkit_filters: tuple[str, ...] = ()
    nbdkit_params: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """The remote host as an operator names it (``local`` for the local form)."""
        if self.transport == "local":
            return "local"
        return f"{self.user}@{self.host}" if self.user else self.host

    def agent_words(self) -> list[str]:
        """The agent's command line, as it runs on the remote host."""
        base = list(self.agent) or (
            ["fusedisk", "store-agent"] if self.transport == "ssh"
            else [sys.executable, "-m", "fusedisk", "store-agent"])
        listen = (f"tcp:0.0.0.0:{self.nbd_port}" if self.transport == "ssh"
                  else "tcp:127.0.0.1:0")
        words = [*base, self.directory, "--tls-psk", self.remote_tls_psk, "--nbd-listen", listen]
        for f in self.nbdkit_filters:
            words += ["--nbdkit-filter", f]
        for p in self.nbdkit_params:
            words += ["--nbdkit-param", p]
        return words

    def agent_argv(self) -> list[str]:
        """What this host runs: the agent itself, or ssh running it."""
        if self.transport == "local":
            return self.agent_words()
        argv = ["ssh", "-T", "-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={max(1, int(self.connect_timeout_s))}"]
        if self.ssh_config:
            argv += ["-F", self.ssh_config]
        if self.ssh_port:
            argv += ["-p", str(self.ssh_port)]
        if self.user:
            argv += ["-l", self.user]
        # ssh hands one string to the remote shell: quote every word once
        return [*argv, self.host, "--", shlex.join(self.agent_words())]


def parse_spec(name: str, text: str) -> RemoteSpec:
    """A remote store spec, or ConfigError with one line naming what is wrong."""
    where = f"store {name!r} ({text})"
    url = urllib.parse.urlsplit(text)
    if url.scheme not in _SCHEMES:
        raise ConfigError(f"{where}: a remote store is nbd+ssh://[user@]host/DIR or "
                          "nbd+local:///DIR")
    if url.fragment:
        raise ConfigError(f"{where}: a '#' has no meaning here")
    directory = urllib.parse.unquote(url.path)
    if not directory.startswith("/") or directory == "/" or "\0" in directory:
        raise ConfigError(f"{where}: needs an absolute directory after the host, e.g. "
                          f"{url.scheme}://{url.netloc}/srv/fusedisk/{name}")
    if ".." in directory.split("/"):
        raise ConfigError(f"{where}: the directory must not contain '..'")
    fields: dict[str, Any] = {}
    if url.scheme == "nbd+ssh":
        try:
            host, port, user = url.hostname, url.port, url.username
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not host:
            raise ConfigError(f"{where}: no host (nbd+ssh://[user@]host/DIR)")
        if url.password is not None:
            raise ConfigError(f"{where}: no password in the spec; ssh uses its keys")
        fields.update(host=host, user=user or "", ssh_port=port or 0)
    elif url.netloc:
        raise ConfigError(f"{where}: nbd+local takes no host (nbd+local:///DIR)")
    try:
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(
            url.query), max_num_fields=64)
    except ValueError as e:
        raise ConfigError(f"{where}: the options are not key=value&... ({e})") from None
    for key, values in query.items():
        if key not in OPTIONS:
            raise ConfigError(f"{where}: unknown option {key!r} (known: {', '.join(OPTIONS)})")
        if len(values) > 1 and key not in _REPEATABLE:
            raise ConfigError(f"{where}: option {key!r} is given twice")
        if any(not v for v in values):
            raise ConfigError(f"{where}: option {key!r} has no value")
    one = {k: v[0] for k, v in query.items()}
    if "tls-psk" in one:
        fields["tls_psk"] = Path(os.path.abspath(one["tls-psk"]))
    fields["remote_tls_psk"] = one.get("remote-tls-psk", str(fields.get("tls_psk", DEFAULT_PSK)))
    if "tls-username" in one:
        fields["tls_username"] = one["tls-username"]
    if "nbd-port" in one:
        if not one["nbd-port"].isdigit() or not 0 <= int(one["nbd-port"]) < 65536:
            raise ConfigError(f"{where}: nbd-port must be a TCP port (0 for any free one)")
        fields["nbd_port"] = int(one["nbd-port"])
    if "agent" in one:
        try:
            fields["agent"] = tuple(shlex.split(one["agent"]))
        except ValueError as e:
            raise ConfigError(f"{where}: agent: {e}") from None
        if not fields["agent"]:
            raise ConfigError(f"{where}: agent names no command")
    if "ssh-config" in one:
        if url.scheme != "nbd+ssh":
            raise ConfigError(f"{where}: ssh-config is for nbd+ssh stores")
        fields["ssh_config"] = os.path.abspath(one["ssh-config"])
    if "connect-timeout" in one:
        try:
            timeout = float(one["connect-timeout"])
        except ValueError:
            timeout = -1.0
        if not 0.1 <= timeout <= 3600:
            raise ConfigError(f"{where}: connect-timeout must be 0.1 to 3600 seconds")
        fields["connect_timeout_s"] = timeout
    fields["nbdkit_filters"] = tuple(query.get("nbdkit-filter", ()))
    fields["nbdkit_params"] = tuple(query.get("nbdkit-param", ()))
    for param in fields["nbdkit_params"]:
        if "=" not in param:
            raise ConfigError(f"{where}: nbdkit-param {param!r} is not KEY=VALUE")
    return RemoteSpec(name=name, text=text, transport=url.scheme.removeprefix("nbd+"),
                      directory=directory.rstrip("/"), **fields)


# -- libnbd --------------------------------------------------------------------------


_LIBNBD: ModuleType | None = None


def libnbd() -> Any:
    """libnbd's Python module (``nbd``), from this Python's path or Debian's tree."""
    global _LIBNBD
    if _LIBNBD is not None:
        return _LIBNBD
    try:
        import nbd  # type: ignore[import-not-found]
    except ImportError:
        tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
        shared = sorted(_DIST_PACKAGES.glob(f"libnbdmod.{tag}-*.so"))
        if not shared or not (_DIST_PACKAGES / "nbd.py").exists():
            raise RemoteError("libnbd's Python module is missing (Debian: apt-get install "
                              "python3-libnbd)") from None
        for mod, path in (("libnbdmod", shared[0]), ("nbd", _DIST_PACKAGES / "nbd.py")):
            spec = importlib.util.spec_from_file_location(mod, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod] = module
            spec.loader.exec_module(module)
        import nbd
    _LIBNBD = nbd
    return nbd


def close_handle(h: Any) -> None:
    """Close a libnbd handle now (its socket too), not when the last reference goes:
    a reference kept anywhere (a traceback, trio's last outcome of a worker thread)
    would keep the connection, and nbdkit with it, alive. The binding has no
    ``close``; its finaliser is what closes, so it is called once, by hand."""
    if hasattr(h, "_o"):
        h.__del__()
        del h._o


def _nbd_reason(e: Exception) -> str:
    text = getattr(e, "string", None) or str(e)
    return " ".join(str(text).split())


# -- the agent, from this side -------------------------------------------------------


class AgentClient:
    """A running agent (over ssh or local) and its request/reply channel.

    Calls block (pipes, with a deadline); a reply with ``ok: false`` is
    raised as ``OSError`` with its errno, anything that breaks the channel
    (the agent gone, a line that is not a reply, no reply in time) as
    RemoteError, one line, naming the store.
    """

    def __init__(self, spec: RemoteSpec) -> None:
        self.spec = spec
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        argv = spec.agent_argv()
        try:
            # cwd /: ``python -m fusedisk`` (the local form) must not import a fusedisk
            # checkout that happens to be the current directory
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, start_new_session=True, cwd="/")
        except OSError as e:
            self._stderr.close()
            raise RemoteError(f"store {spec.name!r}: cannot run {argv[0]} "
                              f"({e.strerror})") from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin
        self._out = self.proc.stdout.fileno()
        self._buffer = b""
        self._id = 0

    def _last_stderr(self) -> str:
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read()[-8192:].decode(
            errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def _broken(self, what: str) -> RemoteError:
        try:
            code = self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            code = None
        said = self._last_stderr()
        how = f"exit code {code}" if code is not None else "still running"
        detail = f": {said}" if said else ""
        return RemoteError(f"store {self.spec.name!r}: the agent on {self.spec.where} {what} "
                           f"({how}){detail}")

    def _readline(self, deadline: float) -> bytes:
        with selectors.DefaultSelector() as sel:
            sel.register(self._out, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.proc.kill()  # a channel out of step is of no further use
                    raise self._broken(f"did not answer within "
                                       f"{self.spec.connect_timeout_s:g} s")
                chunk = os.read(self._out, 1 << 20)
                if not chunk:
                    raise self._broken("ended")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def call(self, op: str, timeout_s: float | None = None, **args: Any) -> dict[str, Any]:
        self._id += 1
        request = json.dumps({"op": op, "id": self._id, **args}).encode() + b"\n"
        try:
            self._in.write(request)
            self._in.flush()
        except (BrokenPipeError, ValueError):
            raise self._broken("ended") from None
        line = self._readline(time.monotonic() + (timeout_s or self.spec.connect_timeout_s))
        try:
            reply = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or reply.get("id") != self._id or "ok" not in reply:
            raise RemoteError(f"store {self.spec.name!r}: the agent on {self.spec.where} "
                              f"answered {line[:80]!r}, not a reply of protocol "
                              f"{PROTOCOL_VERSION}")
        if not reply["ok"]:
            name = str(reply.get("errno", "EIO"))
            raise OSError(getattr(errno, name, errno.EIO), str(reply.get("error", name)))
        return reply

    def close(self) -> None:
        """EOF to the agent (it stops its nbdkit and exits); killed if it lingers."""
        with contextlib.suppress(OSError, ValueError):
            self._in.close()
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


# -- the NBD side --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a remote store's nbdkit listens, and the key this host presents."""

    store: str
    host: str = ""
    port: int = 0
    socket: str = ""
    tls_psk: Path = Path(DEFAULT_PSK)
    tls_username: str = ""
    #: the remote host's boot identity when the agent named this endpoint ("": unknown)
    boot_id: str = ""

    def __str__(self) -> str:
        return self.socket if self.socket else f"{self.host}:{self.port}"

    def handle(self, export: str | None) -> Any:
        """A connected libnbd handle on *export* (None: in option mode, not yet on an
        export). Blocks; RemoteError (one line) if it cannot connect."""
        nbd = libnbd()
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(self.tls_psk))
        h.set_tls_username(self.tls_username)
        if export is None:
            h.set_opt_mode(True)
        else:
            h.set_export_name(export)
        try:
            if self.socket:
                h.connect_unix(self.socket)
            else:
                h.connect_tcp(self.host, str(self.port))
        except nbd.Error as e:
            reason = _nbd_reason(e)
            if "tls" in reason.lower() or "psk" in reason.lower():
                reason += " (do both hosts hold the same key for this identity?)"
            close_handle(h)
            raise RemoteError(f"store {self.store!r}: NBD with TLS-PSK (identity "
                              f"{self.tls_username}) to {self} failed: {reason}") from None
        return h

    def list_exports(self) -> list[str]:
        nbd = libnbd()
        h = self.handle(None)
        names: list[str] = []

        def found(name: str, description: str) -> int:
            names.append(name)
            return 0

        try:
            h.opt_list(found)
            h.opt_abort()
        except nbd.Error as e:
            raise RemoteError(f"store {self.store!r}: listing the exports of {self} failed: "
                              f"{_nbd_reason(e)}") from None
        finally:
            close_handle(h)
        return names


@dataclass(frozen=True, slots=True)
class Hello:
    """What the agent said at the handshake."""

    protocol: int
    version: str
    free_bytes: int
    total_bytes: int
    #: the remote host's boot identity ("" if it could not say)
    boot_id: str = ""


class RemoteStore:
    """A checked, connected remote store: its agent and its nbdkit endpoint.

    Built by :func:`connect`; :meth:`close` ends the agent (and with it nbdkit).
    """

    def __init__(self, spec: RemoteSpec, agent: AgentClient, hello: Hello,
                 endpoint: Endpoint, nbdkit_pid: int) -> None:
        self.spec = spec
        self.agent = agent
        self.hello = hello
        self.endpoint = endpoint
        self.nbdkit_pid = nbdkit_pid

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.agent.close()

    def summary(self) -> str:
        return (f"store {self.spec.name!r} on {self.spec.where}:{self.spec.directory}: agent "
                f"fusedisk {self.hello.version} (protocol {self.hello.protocol}), "
                f"{self.hello.free_bytes >> 30} GiB free, nbdkit TLS-PSK at {self.endpoint}")

    def serve(self) -> Endpoint:
        """The endpoint nbdkit listens on now: the agent starts a new nbdkit if the last
        one died (on a new port where the spec's is 0). Blocks (the agent's channel,
        which is not for two threads at once); RemoteError (one line) if the agent
        is gone or cannot start nbdkit. What an :class:`~fusedisk.nbdfile.NbdFile`'s
        ``endpoint_of`` can call to reconnect after nbdkit died."""
        self.endpoint, self.nbdkit_pid = _serve(self.spec, self.agent,
                                                self.endpoint.tls_username)
        return self.endpoint

    def nbdkit_trouble(self) -> str:
        """nbdkit's last words if it is no longer running, else ""."""
        try:
            status = self.agent.call("nbd-status")
        except (OSError, RemoteError):
            return ""
        if status.get("running"):
            return ""
        return f"nbdkit exited ({status.get('exit')}): {status.get('last_log', '')}"

    async def copy_file_to(self, source: Path, export: str, **options: Any) -> CopyStats:
        """Create *export* (a top-level file of the store) with *source*'s size, sparse,
        and copy *source* into it (:func:`copy_file_to`)."""
        size = os.stat(source).st_size
        try:
            await trio.to_thread.run_sync(
                lambda: self.agent.call("create", path=export, size=size, exclusive=False))
        except OSError as e:
            raise RemoteError(f"store {self.spec.name!r}: cannot create {export}: "
                              f"{e.strerror}") from None
        try:
            return await copy_file_to(source, self.endpoint, export, **options)
        except RemoteError as e:
            trouble = await trio.to_thread.run_sync(self.nbdkit_trouble)
            if trouble:
                raise RemoteError(f"{e}; {trouble}") from None
            raise


def _serve(spec: RemoteSpec, agent: AgentClient, username: str) -> tuple[Endpoint, int]:
    """Ask the agent to serve (it starts nbdkit unless it runs): the endpoint and its pid."""
    try:
        served = agent.call("serve")
    except OSError as e:
        raise RemoteError(f"store {spec.name!r}: the agent on {spec.where} cannot start "
                          f"nbdkit: {e.strerror}") from None
    return served_endpoint(spec, served, username), int(served["pid"])


def served_endpoint(spec: RemoteSpec, served: dict[str, Any], username: str) -> Endpoint:
    """Where nbdkit listens, from the agent's reply to ``serve``."""
    boot = str(served.get("boot_id") or "")
    if "unix" in served:
        return Endpoint(spec.name, socket=str(served["unix"]), tls_psk=spec.tls_psk,
                        tls_username=username, boot_id=boot)
    host = spec.host if spec.transport == "ssh" else str(served["tcp"][0])
    return Endpoint(spec.name, host=host, port=int(served["tcp"][1]), tls_psk=spec.tls_psk,
                    tls_username=username, boot_id=boot)


def connect(spec: RemoteSpec, claim: dict[str, Any] | None = None) -> RemoteStore:
    """Check a remote store up front and keep it connected; RemoteError (one line) if not.

    The checks, in order: the local key file holds the identity; the agent
    starts (over ssh or locally) and answers the handshake with this
    fusedisk's protocol version (and, given a *claim* — ``{"owner": ID, ...}``,
    see agent.py ``Agent._claim`` — claims the store for that datastore, or
    says which other one holds it: :class:`StoreBusy`); nbdkit starts on the
    store directory; libnbd makes a TLS-PSK connection to it and lists its
    exports.
    """
    try:
        keys = tlspsk.load_keys(spec.tls_psk)
    except FusediskError as e:  # its messages name the export command's option
        raise RemoteError(f"store {spec.name!r}: " + str(e).replace("--tls-psk ", "tls-psk=", 1)
                          ) from None
    username = spec.tls_username or next(iter(keys))
    if username not in keys:
        raise RemoteError(f"store {spec.name!r}: identity {username!r} is not in "
                          f"{spec.tls_psk}")
    agent = AgentClient(spec)
    try:
        try:
            args: dict[str, Any] = {"protocol": PROTOCOL_VERSION}
            if claim is not None:
                args["claim"] = claim
            reply = agent.call("hello", **args)
            hello = Hello(int(reply["protocol"]), str(reply["version"]),
                          int(reply["free_bytes"]), int(reply["total_bytes"]),
                          str(reply.get("boot_id") or ""))
        except (KeyError, TypeError, ValueError):
            raise RemoteError(f"store {spec.name!r}: the agent on {spec.where} answered the "
                              "handshake with something else than a hello") from None
        except OSError as e:
            if e.errno == errno.EBUSY and claim is not None:
                raise StoreBusy(f"store {spec.name!r} on {spec.where}: {e.strerror}") from None
            raise RemoteError(f"store {spec.name!r}: the agent on {spec.where} refused the "
                              f"handshake: {e.strerror}") from None
        if hello.protocol != PROTOCOL_VERSION:
            raise RemoteError(
                f"store {spec.name!r}: the agent on {spec.where} speaks protocol "
                f"{hello.protocol} (fusedisk {hello.version}), this fusedisk {__version__} "
                f"speaks {PROTOCOL_VERSION}: install the same fusedisk on both hosts")
        endpoint, pid = _serve(spec, agent, username)
        store = RemoteStore(spec, agent, hello, endpoint, pid)
        try:
            endpoint.list_exports()
        except RemoteError as e:
            trouble = store.nbdkit_trouble()
            raise RemoteError(f"{e}; {trouble}" if trouble else str(e)) from None
        return store
    except BaseException:
        agent.close()
        raise


# -- the copy ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopyStats:
    """What one :func:`copy_file_to` did."""

    bytes_written: int
    bytes_zeroed: int
    elapsed_s: float
    connections: int

    @property
    def rate(self) -> float:
        """Bytes of data copied per second."""
        return self.bytes_written / self.elapsed_s if self.elapsed_s > 0 else 0.0


def extents(fd: int, size: int, zero_holes: bool) -> Iterator[tuple[int, int, bool]]:
    """The ``(offset, length, is_data)`` extents of a file up to *size*, in order;
    holes are left out unless *zero_holes*."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = size  # only a hole is left
        data = min(data, size)
        if data > offset and zero_holes:
            yield offset, data - offset, False
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole - data, True
        offset = hole


def _pieces(fd: int, size: int, zero_holes: bool, request_size: int
            ) -> Iterator[tuple[int, int, bool]]:
    for offset, length, is_data in extents(fd, size, zero_holes):
        if is_data:  # sizes of powers of two: the buffers come from a BufferPool
            largest = 1 << (max(1, request_size).bit_length() - 1)
            for start, n in pow2_pieces(offset, length, largest):
                yield start, n, True
            continue
        step = 1 << 30  # a zero request carries no payload
        for start in range(offset, offset + length, step):
            yield start, min(step, offset + length - start), is_data


#: Every this many bytes the copy asks the kernel to read the next 2 × this many.
_READAHEAD = 4 << 20
#: How many steps of libnbd's state machine one wake-up drives at most (a TLS
#: record of 16 KiB a step: 4 MiB) before it lets other tasks run.
_STEPS_PER_WAKEUP = 256


class BufferPool:
    """Buffers for libnbd's asynchronous commands that are used again and again.

    python3-libnbd 1.14 (Debian 12) never drops the reference ``nbd.Buffer.from_buffer``
    takes on the object it is given: every buffer handed to it lives for ever, so
    a fresh ``bytearray`` per command leaked every byte read and written (measured:
    a store view grew by 3 GiB after 12 relocations of a 256 MiB disk). A buffer
    taken from here is a ``bytearray`` of exactly the size asked for, given back
    when the command is done and handed out again: the leaked references then pin
    only the pool's own buffers, whose number is bounded by the most commands of
    each size ever in flight at once. Sizes are powers of two (callers split their
    requests so: :func:`pow2_pieces`), so that bound stays small.
    """

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self.allocated = 0  #: bytes of buffers ever made (pinned for the process's life)

    def take(self, size: int) -> bytearray:
        free = self._free.get(size)
        if free:
            return free.pop()
        self.allocated += size
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        self._free.setdefault(len(buf), []).append(buf)


def pow2_pieces(offset: int, length: int, largest: int) -> list[tuple[int, int]]:
    """[offset, offset + length) in pieces whose lengths are powers of two of at most
    *largest* (itself a power of two): largest ones first."""
    out = []
    while length > 0:
        n = min(largest, 1 << (length.bit_length() - 1))
        out.append((offset, n))
        offset += n
        length -= n
    return out


def _drive(h: Any) -> int:
    """As many non-blocking steps of the handle's state machine as it can make (bounded);
    returns how many. On the trio thread: run in a worker thread instead (so that
    two connections encrypt on two cores) it measured no faster on a 2-core
    machine, where nbdkit's side of a loopback copy needs the other core."""
    steps = 0
    while steps < _STEPS_PER_WAKEUP and h.poll(0) == 1:
        steps += 1
    return steps


async def _wait(h: Any, stall_timeout_s: float, what: Callable[[], str],
                kick: trio.Event | None = None) -> None:
    """Move the handle's commands on: as far as its socket allows without blocking,
    else wait until the socket is ready for what the handle wants, then tell libnbd.

    libnbd sends one TLS record a step; a trip through trio's loop for each
    record cost more than the record (measured: 10 MB/s), so the non-blocking
    steps (``poll(0)``) come first, and trio waits only when none is possible.
    A set *kick* also ends the wait (nothing is notified): a handle's one
    driver (nbdfile.py) is told so that it has new commands to issue, after
    which the direction to wait for may differ. Only one task may call this
    on a handle at a time.
    """
    nbd = libnbd()
    if h.aio_is_dead() or h.aio_is_closed():
        raise RemoteError(f"{what()}: the NBD connection is gone")
    try:
        steps = _drive(h)
    except nbd.Error as e:
        raise RemoteError(f"{what()}: {_nbd_reason(e)}") from None
    if steps:
        await trio.lowlevel.checkpoint()
        return
    if h.aio_is_dead() or h.aio_is_closed():
        raise RemoteError(f"{what()}: the NBD connection is gone")
    direction = h.aio_get_direction()
    fd = h.aio_get_fd()
    ready = {"read": False, "write": False}
    if not direction:
        raise RemoteError(f"{what()}: the NBD connection has nothing to wait for")
    with trio.move_on_after(stall_timeout_s) as scope:
        async with trio.open_nursery() as nursery:
            async def readable() -> None:
                await trio.lowlevel.wait_readable(fd)
                ready["read"] = True
                nursery.cancel_scope.cancel()

            async def writable() -> None:
                await trio.lowlevel.wait_writable(fd)
                ready["write"] = True
                nursery.cancel_scope.cancel()

            # both at once: a server blocked on sending replies reads no more requests
            if direction & nbd.AIO_DIRECTION_READ:
                nursery.start_soon(readable)
            if direction & nbd.AIO_DIRECTION_WRITE:
                nursery.start_soon(writable)
            if kick is not None:
                async def kicked(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(kicked, kick)
    if scope.cancelled_caught:
        raise RemoteError(f"{what()}: no answer for {stall_timeout_s:g} s")
    try:
        if ready["read"]:
            h.aio_notify_read()
        if ready["write"]:
            h.aio_notify_write()
    except nbd.Error as e:
        raise RemoteError(f"{what()}: {_nbd_reason(e)}") from None


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first RemoteError in a nursery's exception group, else the group itself."""
    matched = group.subgroup(RemoteError)
    while matched is not None:
        inner = matched.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        matched = inner
    return group


async def copy_file_to(source: Path, endpoint: Endpoint, export: str, *, connections: int = 4,
                       depth: int = 8, request_size: int = 1 << 20, zero_holes: bool = False,
                       stall_timeout_s: float = 60.0,
                       progress: Callable[[int], None] | None = None) -> CopyStats:
    """Copy the local file *source* into the NBD *export* (as large as *source*, or larger).

    *connections* handles share the pieces of the file, each with up to
    *depth* writes of *request_size* bytes in flight; the holes of *source*
    are skipped (its extents from ``SEEK_DATA``/``SEEK_HOLE``), or written as
    zeroes that the server may punch (*zero_holes*, for an export that is not
    freshly created). When every write is acknowledged, each connection
    sends an NBD flush and waits for it: on return the data is durable on
    the remote host. *progress* is called with the bytes written so far
    after each acknowledged write. RemoteError (one line) if a connection
    breaks, a request fails or nothing answers for *stall_timeout_s*.
    """
    nbd = libnbd()
    started = time.monotonic()
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    handles: list[Any] = []
    opened = 0
    done = {"written": 0, "zeroed": 0}
    try:
        size = os.fstat(fd).st_size
        handles = [await trio.to_thread.run_sync(endpoint.handle, export)
                   for _ in range(max(1, connections))]
        if handles[0].get_size() < size:
            raise RemoteError(f"store {endpoint.store!r}: export {export} holds "
                              f"{handles[0].get_size()} bytes, {source} {size}")
        pieces = _pieces(fd, size, zero_holes, request_size)
        pool = BufferPool()
        where = f"store {endpoint.store!r}: copy of {source} to {export}"

        async def pump(h: Any) -> None:
            in_flight: dict[int, tuple[int, int, bool, Any]] = {}
            last = [0]

            def what() -> str:
                return f"{where} (offset {last[0]})"

            exhausted = False
            while True:
                while not exhausted and len(in_flight) < depth:
                    try:
                        piece = next(pieces, None)  # no await: each piece goes to one task
                    except OSError as e:
                        raise RemoteError(f"{what()}: the extents of {source}: "
                                          f"{e.strerror}") from None
                    if piece is None:
                        exhausted = True
                        break
                    offset, length, is_data = piece
                    last[0] = offset
                    if is_data and offset % _READAHEAD < length:
                        # the reads below block the loop: ask for the next ones early
                        # (measured: +15-25 % from an evicted file)
                        os.posix_fadvise(fd, offset + _READAHEAD, 2 * _READAHEAD,
                                         os.POSIX_FADV_WILLNEED)
                    try:
                        if is_data:
                            buf = pool.take(length)
                            got = os.preadv(fd, [buf], offset)
                            if got != length:
                                raise RemoteError(f"{what()}: {source} shrank during the copy")
                            aio = buf
                            cookie = h.aio_pwrite(nbd.Buffer.from_buffer(buf), offset)
                        else:
                            aio = None
                            cookie = h.aio_zero(length, offset)
                    except nbd.Error as e:
                        raise RemoteError(f"{what()}: {_nbd_reason(e)}") from None
                    except OSError as e:
                        raise RemoteError(f"{what()}: reading {source}: {e.strerror}") from None
                    in_flight[cookie] = (offset, length, is_data, aio)
                if exhausted and not in_flight:
                    break
                await _wait(h, stall_timeout_s, what)
                for cookie in list(in_flight):
                    offset, length, is_data, _ = in_flight[cookie]
                    try:
                        if not h.aio_command_completed(cookie):
                            continue
                    except nbd.Error as e:
                        raise RemoteError(f"{where}: the write at {offset} failed: "
                                          f"{_nbd_reason(e)}") from None
                    buf = in_flight.pop(cookie)[3]
                    if buf is not None:
                        pool.give(buf)
                    done["written" if is_data else "zeroed"] += length
                    if progress is not None and is_data:
                        progress(done["written"])
            # every write of this connection is acknowledged: now make them durable
            try:
                cookie = h.aio_flush()
            except nbd.Error as e:
                raise RemoteError(f"{where}: flush: {_nbd_reason(e)}") from None
            while True:
                try:
                    if h.aio_command_completed(cookie):
                        break
                except nbd.Error as e:
                    raise RemoteError(f"{where}: flush failed: {_nbd_reason(e)}") from None
                await _wait(h, stall_timeout_s, lambda: f"{where} (flush)")

        try:
            async with trio.open_nursery() as nursery:
                for h in handles:
                    nursery.start_soon(pump, h)
        except BaseExceptionGroup as group:
            # the first connection to fail tells why; the others were cancelled by it
            raise _first(group) from None
        opened = len(handles)
        for h in handles:
            with contextlib.suppress(nbd.Error):
                h.aio_disconnect()
            with contextlib.suppress(RemoteError):
                while not (h.aio_is_closed() or h.aio_is_dead()):
                    await _wait(h, 5.0, lambda: where)
    finally:
        os.close(fd)
        for h in handles:
            close_handle(h)
    return CopyStats(bytes_written=done["written"], bytes_zeroed=done["zeroed"],
                     elapsed_s=time.monotonic() - started, connections=opened)
