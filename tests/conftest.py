"""Fixtures shared by the tests: a real mounted datastore that always goes away."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mounting import MountedDatastore

# Problems a daemon may log that are never expected in a test that passed.
_LOG_BUGS = ("Traceback", " ERROR ", " CRITICAL ")


def require_tools(*tools: str) -> None:
    """Fail the test when a tool that the README's setup installs is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run the README's test command, which installs them")


@pytest.fixture
def datastore(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MountedDatastore]:
    """A mounted datastore (stores a, b; default a) with a clean teardown.

    Fails the test if the daemon logged a traceback or an error that the test
    did not declare with ``@pytest.mark.daemon_errors``.
    """
    marker = request.node.get_closest_marker("datastore_args")
    args = list(marker.args) if marker else []
    ds = MountedDatastore(tmp_path, extra_args=args)
    try:
        ds.start()
        yield ds
    finally:
        ds.teardown()
    if request.node.get_closest_marker("daemon_errors") is None:
        log = ds.log()
        bad = [line for line in log.splitlines() if any(b in line for b in _LOG_BUGS)]
        assert not bad, "daemon logged errors:\n" + "\n".join(bad)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "datastore_args(*args): extra `fusedisk mount` flags")
    config.addinivalue_line("markers", "daemon_errors: the daemon is expected to log errors")
