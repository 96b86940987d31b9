"""Builds fusedisk's one native piece, the libfuse shim (fusedisk/_native/fuseshim.c).

Everything else is in pyproject.toml. The shim is a plain shared library that
fusedisk loads with ctypes (see fusedisk/fuseshim.py); it is built as an
extension only so that pip compiles it at install time.
"""

import shlex
import subprocess

from setuptools import Extension, setup


def _pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args, "fuse3"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit("fusedisk: pkg-config cannot find fuse3; install libfuse3-dev") from None
    return shlex.split(out)


setup(
    ext_modules=[
        Extension(
            "fusedisk._fuseshim",
            sources=["fusedisk/_native/fuseshim.c"],
            include_dirs=[f[2:] for f in _pkg_config("--cflags-only-I")],
            libraries=["fuse3", "dl"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ],
)
