"""``fusedisk demo``: a guided run on a default local layout, as an operator would do it.

Every step is a real command, printed before it runs: mount a datastore
with two stores, create a VM home with a disk image, drive it with fio
(O_DIRECT random writes, verified), take a CBT checkpoint, write more,
ask what changed, show the status, unmount.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import FusediskError

DEFAULT_ROOT = Path("/var/lib/fusedisk-demo")


def _run(argv: list[str], *, capture: bool = False) -> str:
    print(f"\n$ {shlex.join(argv)}", flush=True)
    result = subprocess.run(argv, text=True, capture_output=capture, check=False)
    if capture:
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
    for path in (mnt, *stores.values()):
        path.mkdir(parents=True, exist_ok=True)
    print(f"fusedisk demo: a datastore on {mnt} with stores "
          + ", ".join(f"{n}={p}" for n, p in stores.items()))
    mount = [*fusedisk, "mount", str(mnt), "--state-dir", str(state), "--default-store", "ssd"]
    for name, path in stores.items():
        mount += ["--store", f"{name}={path}"]
    if os.path.ismount(mnt):
        _run([*fusedisk, "umount", str(mnt)])
    _run(mount)
    try:
        home = mnt / "web01"
        home.mkdir(exist_ok=True)
        (home / "web01.vmx").write_text('displayName = "web01"\nmemsize = "2048"\n')
        (home / "web01.nvram").write_bytes(os.urandom(8192))
        disk = home / "disk0.img"
        with open(disk, "wb") as f:
            f.truncate(1 << 30)
        print(f"\ncreated VM home {home}: web01.vmx, web01.nvram, disk0.img (1 GiB, sparse)")
        _run(["ls", "-ls", str(home)])
        fio = ["fio", "--name=guest", f"--filename={disk}", "--size=256M", "--rw=randwrite",
               "--bs=4k", "--direct=1", "--ioengine=psync", "--time_based",
               f"--runtime={seconds}", "--eta=always", "--eta-newline=1",
               "--verify=crc32c", "--verify_state_save=0"]
        _run(fio[:1] + fio[1:])  # a guest writing with O_DIRECT, verified at the end
        change_id = _run([*fusedisk, "cbt", "checkpoint", str(mnt), str(disk)],
                         capture=True).strip()
        _run(["dd", "if=/dev/urandom", f"of={disk}", "bs=64k", "count=16", "seek=4096",
              "oflag=direct", "conv=notrunc", "status=none"])
        changed = json.loads(_run([*fusedisk, "cbt", "changes", str(mnt), str(disk),
                                   "--since", change_id, "--json"], capture=True))
        total = sum(length for _, length in changed["extents"])
        print(f"\nsince {change_id}: {len(changed['extents'])} extent(s), {total >> 10} KiB "
              "changed (the 1 MiB dd wrote at offset 256 MiB)")
        _run([*fusedisk, "status", str(mnt)])
        _run(["du", "-sh", str(stores["ssd"] / "web01")])
        print("\nlive relocation (`fusedisk migrate`) is not built yet: see the open issue")
    finally:
        if not keep:
            _run([*fusedisk, "umount", str(mnt)])
    print(f"\ndemo finished; the stores stay under {root / 'stores'}"
          + (f", the datastore stays mounted on {mnt}" if keep else ""))
    return 0
