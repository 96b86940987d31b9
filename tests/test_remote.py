"""Remote stores (remote.py) against real servers: the agent, nbdkit with TLS-PSK, libnbd.

The "remote host" is this one: ``nbd+local:///DIR`` runs the agent as a
local command, and the agent starts nbdkit's ``file`` plugin on 127.0.0.1
with ``--tls=require --tls-psk``. What is proven: spec errors are one line;
the up-front check passes on a good store and ``mount`` then refuses
honestly; a wrong key, an unreachable host, an agent of another version
are each one line and a non-zero exit; a copy arrives whole and sparse
(read back from the directory and over NBD); a broken or failing nbdkit
ends a copy with a clear error. nbdkit is always stopped: by the agent's
exit, and by pid in each test's ``finally`` should anything survive.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import trio

from fusedisk import remote
from fusedisk.agent import PROTOCOL_VERSION
from fusedisk.config import build_config
from fusedisk.errors import ConfigError

from .mounting import wait_for

MiB = 1 << 20


def write_keys(path: Path, identity: str = "fusedisk") -> Path:
    path.write_text(f"{identity}:{secrets.token_hex(32)}\n")
    os.chmod(path, 0o600)
    return path


def nbdkits_serving(directory: Path) -> list[int]:
    """The pids of nbdkit processes serving *directory* (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nbdkit") and f"dir={directory}".encode() in argv:
            found.append(int(entry))
    return found


def stop_nbdkits(directory: Path) -> list[int]:
    """Kill (by pid) every nbdkit still serving *directory*; returns their pids."""
    left = nbdkits_serving(directory)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


class Site:
    """A store directory with its key file, and spec texts pointing at it."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "remote-store"
        self.dir.mkdir()
        self.keys = write_keys(tmp_path / "nbd.psk")

    def spec_text(self, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"tls-psk": str(self.keys), **options}.items())
        return f"nbd+local://{self.dir}?{query}"

    def spec(self, **options: str) -> remote.RemoteSpec:
        return remote.parse_spec("far", self.spec_text(**options))




def fusedisk(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusedisk", *argv], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith("fusedisk: error: ") and done.stderr.count("\n") == 1, \
        done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr
    return done.stderr


def mount_with(tmp_path: Path, spec: str) -> subprocess.CompletedProcess[str]:
    local = tmp_path / "local"
    local.mkdir(exist_ok=True)
    (tmp_path / "mnt").mkdir(exist_ok=True)
    return fusedisk("mount", "--store", f"near={local}", "--store", f"far={spec}",
                    "--default-store", "near", "--state-dir", str(tmp_path / "state"),
                    str(tmp_path / "mnt"))


# -- specs ------------------------------------------------------------------------------


def test_specs_parse() -> None:
    spec = remote.parse_spec("far", "nbd+ssh://ops@store7.example:2222/srv/fusedisk/ds1?"
                             "tls-psk=/etc/k.psk&tls-username=ds1&nbd-port=10900&"
                             "nbdkit-filter=delay&nbdkit-param=delay-write=5ms")
    assert (spec.transport, spec.user, spec.host, spec.ssh_port, spec.directory) == (
        "ssh", "ops", "store7.example", 2222, "/srv/fusedisk/ds1")
    assert (spec.tls_psk, spec.remote_tls_psk, spec.tls_username, spec.nbd_port) == (
        Path("/etc/k.psk"), "/etc/k.psk", "ds1", 10900)
    argv = spec.agent_argv()
    assert argv[:2] == ["ssh", "-T"] and argv[-3:-1] == ["store7.example", "--"]
    assert ["-p", "2222"] == argv[argv.index("-p"):argv.index("-p") + 2]
    assert argv[-1] == ("fusedisk store-agent /srv/fusedisk/ds1 --tls-psk /etc/k.psk "
                        "--nbd-listen tcp:0.0.0.0:10900 --nbdkit-filter delay "
                        "--nbdkit-param delay-write=5ms")
    spaced = remote.parse_spec("far", "nbd+ssh://h/srv/my%20store?agent=/opt/fd/bin/fusedisk"
                               "%20store-agent")
    assert spaced.agent_argv()[-1] == ("/opt/fd/bin/fusedisk store-agent '/srv/my store' "
                                       f"--tls-psk {remote.DEFAULT_PSK} --nbd-listen "
                                       f"tcp:0.0.0.0:{remote.DEFAULT_NBD_PORT}")
    local = remote.parse_spec("far", "nbd+local:///srv/x/")
    assert (local.transport, local.directory, local.where) == ("local", "/srv/x", "local")
    assert local.agent_argv()[:4] == [sys.executable, "-m", "fusedisk", "store-agent"]


@pytest.mark.parametrize(("text", "words"), [
    ("nbd+ftp://host/srv", "nbd+ssh://[user@]host/DIR"),
    ("nbd+ssh:///srv", "no host"),
    ("nbd+ssh://host", "absolute directory"),
    ("nbd+ssh://host/", "absolute directory"),
    ("nbd+ssh://host/srv/../etc", "'..'"),
    ("nbd+ssh://u:pw@host/srv", "no password"),
    ("nbd+ssh://host:99999/srv", "Port out of range"),
    ("nbd+local://host/srv", "takes no host"),
    ("nbd+local:///srv?colour=blue", "unknown option 'colour'"),
    ("nbd+local:///srv?tls-psk=/a&tls-psk=/b", "given twice"),
    ("nbd+local:///srv?tls-psk=", "has no value"),
    ("nbd+local:///srv?nbd-port=http", "nbd-port"),
    ("nbd+local:///srv?connect-timeout=0", "connect-timeout"),
    ("nbd+local:///srv?agent=%22unclosed", "agent"),
    ("nbd+local:///srv?nbdkit-param=novalue", "KEY=VALUE"),
    ("nbd+local:///srv#frag", "'#'"),
])
def test_bad_specs_are_one_line(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(config_file=None, mountpoint=str(tmp_path / "m"),
                     stores=[f"near={tmp_path}/a", f"far={text}"], default_store="near",
                     state_dir=str(tmp_path / "s"), block_size=None, allow_other=None)
    message = str(caught.value)
    assert "\n" not in message and words in message and "store 'far'" in message, message


def test_a_bad_spec_at_mount_is_one_line(tmp_path: Path) -> None:
    one_line_error(mount_with(tmp_path, "nbd+ssh://host"), "store 'far'", "absolute directory")
    assert not (tmp_path / "state").exists()


def test_a_remote_store_in_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "ds.toml"
    config.write_text(f'mountpoint = "{tmp_path}/m"\nstate_dir = "{tmp_path}/s"\n'
                      f'default_store = "near"\n[stores]\nnear = "{tmp_path}/a"\n'
                      'far = "nbd+ssh://ops@h/srv/ds1"\n')
    built = build_config(config_file=config, mountpoint=None, stores=[], default_store=None,
                         state_dir=None, block_size=None, allow_other=None)
    assert list(built.stores) == ["near"] and built.remote_stores["far"].host == "h"


# -- the up-front check ------------------------------------------------------------------


def test_check_passes(tmp_path: Path, site: Site) -> None:
    with remote.connect(site.spec()) as store:
        assert store.hello.protocol == PROTOCOL_VERSION and store.hello.free_bytes > 0
        assert store.endpoint.host == "127.0.0.1" and store.endpoint.port > 0
        assert nbdkits_serving(site.dir) == [store.nbdkit_pid]
        assert "nbdkit TLS-PSK at 127.0.0.1:" in store.summary()
    assert nbdkits_serving(site.dir) == []  # the agent's exit took nbdkit with it


def test_wrong_key_is_refused(tmp_path: Path, site: Site) -> None:
    other = write_keys(tmp_path / "other.psk")  # same identity, another key
    with pytest.raises(remote.RemoteError) as caught:
        remote.connect(site.spec(**{"tls-psk": str(other), "remote-tls-psk": str(site.keys)}))
    message = str(caught.value)
    assert "\n" not in message and "NBD with TLS-PSK (identity fusedisk)" in message
    assert "same key" in message
    stranger = write_keys(tmp_path / "stranger.psk", identity="stranger")
    with pytest.raises(remote.RemoteError, match="identity stranger"):
        remote.connect(site.spec(**{"tls-psk": str(stranger),
                                    "remote-tls-psk": str(site.keys)}))
    one_line_error(mount_with(tmp_path, site.spec_text(
        **{"tls-psk": str(other), "remote-tls-psk": str(site.keys)})), "TLS-PSK")


def test_local_key_file_problems(tmp_path: Path, site: Site) -> None:
    with pytest.raises(remote.RemoteError, match="cannot read it"):
        remote.connect(site.spec(**{"tls-psk": str(tmp_path / "none")}))
    with pytest.raises(remote.RemoteError, match="identity 'ds9' is not in"):
        remote.connect(site.spec(**{"tls-username": "ds9"}))
    (tmp_path / "bad.psk").write_text("no colon here\n")
    with pytest.raises(remote.RemoteError, match="IDENTITY:HEXKEY"):
        remote.connect(site.spec(**{"tls-psk": str(tmp_path / "bad.psk")}))


def test_remote_key_file_missing(tmp_path: Path, site: Site) -> None:
    done = mount_with(tmp_path, site.spec_text(**{"remote-tls-psk": str(tmp_path / "none")}))
    one_line_error(done, "store 'far'", "cannot read it")  # the agent checks it at start


def test_unreachable_host_is_one_line(tmp_path: Path, site: Site) -> None:
    # port 1 on this host: nothing listens, so ssh is refused at once
    spec = f"nbd+ssh://127.0.0.1:1{site.dir}?tls-psk={site.keys}&connect-timeout=20"
    one_line_error(mount_with(tmp_path, spec), "store 'far': the agent on 127.0.0.1 ended",
                   "Connection refused")
    assert not (tmp_path / "state").exists()


def test_agent_of_another_version_is_one_line(tmp_path: Path, site: Site) -> None:
    impostor = tmp_path / "agent99.py"
    impostor.write_text(
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    req = json.loads(line)\n"
        "    print(json.dumps({'ok': True, 'id': req['id'], 'protocol': 99, 'version': '9.0',"
        " 'free_bytes': 1, 'total_bytes': 2}), flush=True)\n")
    one_line_error(mount_with(tmp_path, site.spec_text(agent=f"{sys.executable}%20{impostor}")),
                   "speaks protocol 99 (fusedisk 9.0)", f"speaks {PROTOCOL_VERSION}",
                   "same fusedisk on both hosts")


def test_agent_that_is_not_an_agent(tmp_path: Path, site: Site) -> None:
    chatty = tmp_path / "chatty.py"
    chatty.write_text("import sys\nfor line in sys.stdin:\n    print('hello', flush=True)\n")
    one_line_error(mount_with(tmp_path, site.spec_text(agent=f"{sys.executable}%20{chatty}")),
                   "answered b'hello", "not a reply")
    one_line_error(mount_with(tmp_path, site.spec_text(agent="true")),
                   "the agent on local ended (exit code 0)")
    one_line_error(mount_with(tmp_path, site.spec_text(agent="/nonexistent/agent")),
                   "cannot run /nonexistent/agent")
    mute = tmp_path / "mute.py"
    mute.write_text("import time\ntime.sleep(600)\n")
    one_line_error(mount_with(tmp_path, site.spec_text(agent=f"{sys.executable}%20{mute}",
                                                       **{"connect-timeout": "0.5"})),
                   "did not answer within 0.5 s")


# -- the copy --------------------------------------------------------------------------


def sparse_source(path: Path) -> list[tuple[int, bytes]]:
    """A 24 MiB + 123 byte file: data in a few places, holes between; the pieces."""
    pieces = [(0, os.urandom(3 * MiB + 5)), (8 * MiB, os.urandom(MiB)),
              (16 * MiB + 4096, os.urandom(5 * MiB)), (24 * MiB, os.urandom(123))]
    with open(path, "wb") as f:
        f.truncate(24 * MiB + 123)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return pieces


def hole_at(path: Path, offset: int, length: int) -> bool:
    """Whether [offset, offset+length) of *path* is all hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError:
        return True
    finally:
        os.close(fd)


async def test_copy_arrives_whole_and_sparse(tmp_path: Path, site: Site) -> None:
    source = tmp_path / "disk0.img"
    pieces = sparse_source(source)
    seen: list[int] = []
    with remote.connect(site.spec()) as store:
        stats = await store.copy_file_to(source, "disk0.img", connections=3, depth=4,
                                         request_size=256 << 10, progress=seen.append)
        payload = sum(len(d) for _, d in pieces)  # extents are whole file system blocks
        assert payload <= stats.bytes_written <= payload + len(pieces) * 4096
        assert stats.connections == 3 and stats.rate > 0
        assert seen == sorted(seen) and seen[-1] == stats.bytes_written
        copy = site.dir / "disk0.img"
        assert copy.read_bytes() == source.read_bytes()
        assert hole_at(copy, 4 * MiB, 4 * MiB) and hole_at(copy, 10 * MiB, 6 * MiB)
        # and over NBD, through the same TLS endpoint, by a fresh libnbd handle
        h = await trio.to_thread.run_sync(store.endpoint.handle, "disk0.img")
        assert h.get_size() == source.stat().st_size
        for offset, data in pieces:
            assert h.pread(len(data), offset) == data
        assert h.pread(MiB, 5 * MiB) == bytes(MiB)
        h.shutdown()
        remote.close_handle(h)

        # onto an export that holds old data: holes become zeroes (or are punched)
        (site.dir / "old.img").write_bytes(b"\xaa" * (24 * MiB + 123))
        stats = await remote.copy_file_to(source, store.endpoint, "old.img", zero_holes=True)
        assert stats.bytes_zeroed == 24 * MiB + 123 - stats.bytes_written
        assert (site.dir / "old.img").read_bytes() == source.read_bytes()


async def test_export_smaller_than_the_file(tmp_path: Path, site: Site) -> None:
    source = tmp_path / "big"
    source.write_bytes(os.urandom(MiB))
    (site.dir / "small").write_bytes(bytes(4096))
    with remote.connect(site.spec()) as store:
        with pytest.raises(remote.RemoteError, match="export small holds 4096 bytes"):
            await remote.copy_file_to(source, store.endpoint, "small")


async def test_nbdkit_killed_mid_copy(tmp_path: Path, site: Site) -> None:
    source = tmp_path / "disk0.img"
    source.write_bytes(os.urandom(16 * MiB))
    # slow writes (the delay filter): the copy is surely still going when nbdkit dies
    with remote.connect(site.spec(**{"nbdkit-filter": "delay",
                                     "nbdkit-param": "delay-write=50ms"})) as store:
        pid = store.nbdkit_pid

        def kill_after_first_write(written: int) -> None:
            if written and nbdkits_serving(site.dir) == [pid]:
                os.kill(pid, signal.SIGKILL)

        with pytest.raises(remote.RemoteError) as caught:
            await store.copy_file_to(source, "disk0.img", connections=2, depth=2,
                                     request_size=MiB, progress=kill_after_first_write)
        message = str(caught.value)
        assert "\n" not in message and "store 'far': copy of" in message, message
        assert "nbdkit exited (-9)" in message, message


async def test_injected_write_errors_fail_the_copy(tmp_path: Path, site: Site) -> None:
    source = tmp_path / "disk0.img"
    source.write_bytes(os.urandom(2 * MiB))
    with remote.connect(site.spec(**{"nbdkit-filter": "error", "nbdkit-param":
                                     "error-pwrite-rate=1"})) as store:
        with pytest.raises(remote.RemoteError,
                           match=r"the write at \d+ failed: .*Input/output error"):
            await store.copy_file_to(source, "disk0.img")


async def test_a_stalled_server_times_out(tmp_path: Path, site: Site) -> None:
    source = tmp_path / "disk0.img"
    source.write_bytes(os.urandom(MiB))
    with remote.connect(site.spec(**{"nbdkit-filter": "delay",
                                     "nbdkit-param": "delay-write=3"})) as store:
        with pytest.raises(remote.RemoteError, match=r"no answer for 0\.5 s"):
            await store.copy_file_to(source, "disk0.img", stall_timeout_s=0.5)


def agent_on_unix_socket(site: Site, sock: Path) -> tuple[subprocess.Popen[bytes], int]:
    """An agent started with ``--nbd-listen unix:SOCK``, asked to make a 10 MiB export and
    to serve; the process and nbdkit's pid."""
    agent = subprocess.Popen(
        [sys.executable, "-m", "fusedisk", "store-agent", str(site.dir), "--tls-psk",
         str(site.keys), "--nbd-listen", f"unix:{sock}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert agent.stdin is not None and agent.stdout is not None
    agent.stdin.write(b'{"op": "create", "path": "empty.img", "size": 10485760}\n'
                      b'{"op": "serve"}\n')
    agent.stdin.flush()
    created = json.loads(agent.stdout.readline())
    assert created["ok"] and created["stat"]["size"] == 10485760, created
    served = json.loads(agent.stdout.readline())
    assert served["unix"] == str(sock), served
    return agent, int(served["pid"])


def end_agent(agent: subprocess.Popen[bytes]) -> int:
    assert agent.stdin is not None
    agent.stdin.close()
    return agent.wait(30)


async def test_a_file_of_holes_and_a_unix_socket(tmp_path: Path, site: Site) -> None:
    """An all-hole file copies as no data; the agent also serves on a Unix socket."""
    source = tmp_path / "empty.img"
    source.touch()
    os.truncate(source, 10 * MiB)
    agent, pid = agent_on_unix_socket(site, tmp_path / "nbd.sock")
    try:
        # the agent answers once the listening socket is nbdkit's fd 3, which may be
        # before its shell has exec'd nbdkit: the pid is the same, its argv not yet
        wait_for(lambda: nbdkits_serving(site.dir) == [pid], 30, "the agent's nbdkit")
        endpoint = remote.Endpoint("far", socket=str(tmp_path / "nbd.sock"),
                                   tls_psk=site.keys, tls_username="fusedisk")
        assert await trio.to_thread.run_sync(endpoint.list_exports) == ["empty.img"]
        stats = await remote.copy_file_to(source, endpoint, "empty.img", connections=2)
        assert (stats.bytes_written, stats.bytes_zeroed) == (0, 0)
        assert hole_at(site.dir / "empty.img", 0, 10 * MiB)
        assert end_agent(agent) == 0
        assert nbdkits_serving(site.dir) == []
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_nbdkit_is_steered_to_aes_gcm(tmp_path: Path, site: Site) -> None:
    """Where the CPU has AES instructions and no GnuTLS policy decides, the session
    nbdkit negotiates is AES-GCM (ChaCha20 made copies 3x slower here)."""
    from fusedisk import agent

    if not agent._cpu_has_aes() or agent.GNUTLS_SYSTEM_CONFIG.exists() \
            or "GNUTLS_SYSTEM_PRIORITY_FILE" in os.environ:
        pytest.skip("GnuTLS's own choice applies on this machine (no AES, or a policy)")
    (site.dir / "disk0").write_bytes(bytes(4096))
    with remote.connect(site.spec()) as store:
        ep = store.endpoint
        done = subprocess.run(
            ["nbdinfo", f"nbds://fusedisk@{ep.host}:{ep.port}/disk0?tls-psk-file={site.keys}"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stderr.splitlines() if "connection is using TLS" in ln)
    assert "cipher AES-" in line and "GCM" in line, line


def test_store_check_command(tmp_path: Path, site: Site) -> None:
    """``fusedisk store-check`` is the up-front check on its own: exit 0 and one line per
    store when all pass, one line and exit 1 at the first that fails."""
    done = fusedisk("store-check", f"far={site.spec_text()}", f"far2={site.spec_text()}")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("ok: store 'far' on local:")
    assert "nbdkit TLS-PSK at 127.0.0.1:" in lines[0] and lines[1].startswith("ok: store 'far2'")
    assert nbdkits_serving(site.dir) == []
    one_line_error(fusedisk("store-check", f"far={site.dir}"), "expected NAME=nbd+ssh://")
    one_line_error(fusedisk("store-check", f"far=nbd+ssh://127.0.0.1:1/srv?tls-psk={site.keys}"),
                   "the agent on 127.0.0.1 ended", "Connection refused")
    one_line_error(fusedisk("store-check", "far=nbd+ssh://127.0.0.1:1/srv?tls-psk=/none"),
                   "store 'far': tls-psk=/none: cannot read it")


def test_a_missing_remote_directory_is_one_line(tmp_path: Path, site: Site) -> None:
    spec = f"nbd+local://{tmp_path}/no-such-dir?tls-psk={site.keys}"
    one_line_error(mount_with(tmp_path, spec), "store 'far': the agent on local ended "
                   "(exit code 1)", f"{tmp_path}/no-such-dir is not a directory")


# -- over a real ssh -----------------------------------------------------------------


async def test_over_ssh(tmp_path: Path, site: Site, ssh_config: Path) -> None:
    """nbd+ssh for real: the agent started by ssh (its command quoted through the remote
    shell, a directory with a space in its name), nbdkit on a free port, a copy."""
    spaced = tmp_path / "remote store"
    spaced.mkdir()
    fusedisk_bin = Path(sys.executable).parent / "fusedisk"
    spec = remote.parse_spec("far", f"nbd+ssh://127.0.0.1{urllib.parse.quote(str(spaced))}"
                             f"?tls-psk={site.keys}&nbd-port=0&ssh-config={ssh_config}"
                             f"&agent={fusedisk_bin}%20store-agent")
    source = tmp_path / "disk0.img"
    source.write_bytes(os.urandom(3 * MiB))
    try:
        with remote.connect(spec) as store:
            assert store.spec.where == "127.0.0.1" and store.endpoint.host == "127.0.0.1"
            assert store.hello.protocol == PROTOCOL_VERSION
            await store.copy_file_to(source, "disk0.img")
            assert (spaced / "disk0.img").read_bytes() == source.read_bytes()
        assert nbdkits_serving(spaced) == []
        done = fusedisk("store-check", f"far={spec.text}")
        assert done.returncode == 0 and "ok: store 'far' on 127.0.0.1:" in done.stdout, done
    finally:
        stop_nbdkits(spaced)
