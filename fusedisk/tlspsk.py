"""TLS with pre-shared keys for NBD exports (``fusedisk export --tls-psk FILE``).

The key file has the format of GnuTLS's ``psktool`` (which nbdkit, qemu-nbd
and libnbd's ``tls-psk-file=`` read too): one ``IDENTITY:HEXKEY`` per line,
so one file serves both ends. A client names its identity
(``tls-username=``); an unknown identity or a wrong key fails the TLS
handshake of that connection only.

Python's ``ssl`` gains PSK callbacks only in 3.13; on 3.11 the well-kept
``sslpsk3`` package adds them to an ``SSLContext`` (natively on 3.13+, so
nothing changes on a newer Python). Its server set-up re-enters OpenSSL's
accept state, which must happen once per connection, not on every retry
of a non-blocking handshake as trio's ``SSLStream`` makes them: the object
class below sets it up once, and drops the package's per-connection
registry entry when the handshake ends, so a long-lived export does not
grow with its connections. TLS 1.2 with the PSK cipher suites is what
GnuTLS and OpenSSL agree on for PSK without certificates.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

from .errors import FusediskError

_LINE = re.compile(r"([^:\s]{1,128}):([0-9a-fA-F]{2,256})")


def load_keys(path: Path) -> dict[str, bytes]:
    """The identities and keys of a psktool key file; FusediskError (one line) if
    it cannot be read or a line is malformed."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not text"
        raise FusediskError(f"--tls-psk {path}: cannot read it ({reason})") from None
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if match is None or len(match.group(2)) % 2:
            raise FusediskError(f"--tls-psk {path}: line {number} is not IDENTITY:HEXKEY "
                                "(make one with: psktool -u NAME -p FILE)")
        keys[match.group(1)] = bytes.fromhex(match.group(2))
    if not keys:
        raise FusediskError(f"--tls-psk {path}: holds no key")
    return keys


def server_context(keys: dict[str, bytes]) -> ssl.SSLContext:
    """A server-side context that accepts exactly the identities of *keys*."""
    import sslpsk3
    import sslpsk3.sslpsk3 as impl

    registry: dict[int, Any] = impl.psk_contexts

    class _Once(impl.SSLPSKObject):  # type: ignore[misc]
        _psk_ids: set[int] | None = None

        def do_handshake(self) -> None:
            if self._psk_ids is None:
                before = set(registry)
                self.context.setup_psk_callbacks(self)
                self._psk_ids = set(registry) - before
            try:
                ssl.SSLObject.do_handshake(self)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # trio comes back with more bytes
            except BaseException:
                self._forget()
                raise
            self._forget()

        def _forget(self) -> None:
            for key in self._psk_ids or ():
                registry.pop(key, None)
            self._psk_ids = set()

    context = sslpsk3.SSLPSKContext(ssl.PROTOCOL_TLS_SERVER)
    context.sslobject_class = _Once
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("PSK")
    context.set_psk_server_callback(lambda identity: keys.get(identity or "", b""))
    assert isinstance(context, ssl.SSLContext)
    return context
