"""``fusedisk demo``: a live relocation on a default local layout, as an operator does it.

Every step is a real command, printed before it runs: mount a datastore
with two stores (ssd, hdd), create a VM home with a disk image, start a
guest (fio: O_DIRECT random writes with a checksum in every block), move
the VM home from ssd to hdd while the guest writes (with the progress
display), let the guest finish, verify every block it wrote, show the
status and changed block tracking, unmount.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import FusediskError

DEFAULT_ROOT = Path("/var/lib/fusedisk-demo")


def _run(argv: list[str], *, capture: bool = False, show: bool = True) -> str:
    print(f"\n$ {shlex.join(argv)}", flush=True)
    result = subprocess.run(argv, text=True, capture_output=capture, check=False)
    if capture and show:
        print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()
        raise FusediskError(f"demo step failed: {shlex.join(argv)}"
                            + (f": {detail[-1]}" if detail else ""))
    return result.stdout if capture else ""


def run_demo(root: Path, seconds: int, keep: bool) -> int:
    """Run the demo under *root*; unmount at the end unless *keep*."""
    if shutil.which("fio") is None:
        raise FusediskError("the demo needs fio: run `bash scripts/setup demo`, which installs it")
    fusedisk = [sys.executable, "-m", "fusedisk"]
    mnt, state = root / "ds1", root / "state"
    stores = {"ssd": root / "stores" / "ssd", "hdd": root / "stores" / "hdd"}
    try:
        for path in (mnt, *stores.values()):
            path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FusediskError(f"cannot lay out the demo under {root}: "
                            f"{e.strerror or e} ({e.filename})") from None
    print(f"fusedisk demo: a datastore on {mnt} with stores "
          + ", ".join(f"{n}={p}" for n, p in stores.items()))
    mount = [*fusedisk, "mount", str(mnt), "--state-dir", str(state), "--default-store", "ssd"]
    for name, path in stores.items():
        mount += ["--store", f"{name}={path}"]
    if os.path.ismount(mnt):
        _run([*fusedisk, "umount", str(mnt)])
    _run(mount)
    guest: subprocess.Popen[bytes] | None = None
    try:
        status = json.loads(
            _run([*fusedisk, "status", str(mnt), "--json"], capture=True, show=False)
        )
        if "web01" in status["placement"]:
            print("removing web01, left by an earlier demo run")
            subprocess.run(["rm", "-rf", str(mnt / "web01")], check=True)
        home = mnt / "web01"
        home.mkdir()
        (home / "web01.vmx").write_text('displayName = "web01"\nmemsize = "2048"\n')
        (home / "web01.nvram").write_bytes(os.urandom(8192))
        (home / "logs").mkdir()
        (home / "logs" / "vmware.log").write_text("power on\n")
        disk = home / "disk0.img"
        with open(disk, "wb") as f:
            f.truncate(4 << 30)
        print(f"\ncreated VM home {home}: web01.vmx, web01.nvram, logs/, disk0.img "
              "(4 GiB, sparse)")
        # The guest: O_DIRECT random writes with crc32c checksums in every block,
        # each block written once, so a verify-only replay can check every byte later.
        fio = ["fio", "--name=guest", f"--filename={disk}", "--offset=0", "--size=512M",
               "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=psync",
               "--verify=crc32c", "--verify_state_save=0", "--randseed=42"]
        print(f"\n$ {shlex.join(fio)} --rate_iops=... &   # the guest, in the background")
        guest = subprocess.Popen(
            [*fio, f"--rate_iops={max(1000, 131072 // max(seconds, 1))}", "--do_verify=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(2)
        _run(["ls", "-ls", str(home)])
        _run([*fusedisk, "migrate", str(mnt), "web01", "--to", "hdd"])
        print("\nthe guest keeps writing, now to hdd; waiting for it to finish its pass ...",
              flush=True)
        if guest.wait() != 0:
            raise FusediskError("the fio guest failed during the relocation")
        guest = None
        _run([*fio, "--verify_only"], capture=True, show=False)
        print("verify: every block the guest wrote reads back with its checksum")
        _run([*fusedisk, "status", str(mnt)])
        _run(["du", "-sh", "--apparent-size", str(stores["hdd"] / "web01")])
        _run(["du", "-sh", str(stores["hdd"] / "web01")])
        change_id = _run([*fusedisk, "cbt", "checkpoint", str(mnt), str(disk)],
                         capture=True).strip()
        _run(["dd", "if=/dev/urandom", f"of={disk}", "bs=64k", "count=16", "seek=16384",
              "oflag=direct", "conv=notrunc", "status=none"])
        _run([*fusedisk, "cbt", "changes", str(mnt), str(disk), "--since", change_id,
              "--json"], capture=True)
        print("(changed block tracking: the 1 MiB that dd wrote at 1 GiB, for backup tools)")
    finally:
        if guest is not None:
            guest.kill()
            guest.wait()
        if not keep:
            _run([*fusedisk, "umount", str(mnt)])
    print(f"\ndemo finished; the stores stay under {root / 'stores'}"
          + (f", the datastore stays mounted on {mnt}" if keep else ""))
    return 0
