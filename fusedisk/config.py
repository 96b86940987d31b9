"""Datastore configuration: a TOML file, overridden by command-line flags.

Every error names the file, the key and what is wrong, in one line. The
limits of what an operator may ask for (block size, copy rate, pause
budget) live here too, so the command line, the control socket and the
relocation engine refuse the same values.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .remote import RemoteSpec, is_remote_spec, parse_spec
from .sizes import parse_size

DEFAULT_BLOCK_SIZE = 64 << 10
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 64 << 20
#: The fastest copy rate limit an operator may set, in bytes/s (0 is unlimited).
#: No store comes near it: a larger value is a typo (or ``1e400``), and is refused
#: rather than quietly meaning "unlimited".
MAX_RATE = 1 << 40
#: The range of a relocation's pause budget (``--max-pause``), in milliseconds.
MIN_PAUSE_MS, MAX_PAUSE_MS = 1, 60_000
#: The longest ``migrate --stall-timeout``, in seconds (a day).
MAX_STALL_TIMEOUT_S = 86_400

_KNOWN_KEYS = {
    "mountpoint", "state_dir", "default_store", "block_size", "allow_other", "cbt", "stores",
}


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ``fusedisk mount`` needs; built by :func:`build_config`."""

    mountpoint: Path
    state_dir: Path
    stores: dict[str, Path]
    default_store: str
    block_size: int = DEFAULT_BLOCK_SIZE
    allow_other: bool = False
    #: changed block tracking with crash-safe change ids (off: no change ids, a
    #: little less work per write)
    cbt: bool = True
    source: str = "command line"
    extra: dict[str, Any] = field(default_factory=dict)
    #: stores on other hosts (``NAME=nbd+ssh://...``), apart from the local ``stores``;
    #: checked at mount, which then refuses them (they cannot hold entries yet)
    remote_stores: dict[str, RemoteSpec] = field(default_factory=dict)


def _check_store_name(name: str, where: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
        raise ConfigError(
            f"{where}: store name {name!r} must be letters, digits, '-', '_' or '.', "
            "not starting with '.'"
        )


def _parse_size(text: str) -> int:
    """:func:`parse_size`, with ``inf`` and ``1e400`` (no integer) refused like any non-size."""
    try:
        return parse_size(text)
    except OverflowError:
        raise ValueError(f"{text!r} is not a size (it is too large)") from None


def parse_rate(text: str) -> int:
    """A copy rate limit in bytes/s from ``"200M"``, ``"200M/s"`` or ``"0"`` (unlimited).

    Raises ``ValueError`` with a message for the operator: not a size, or
    more than :data:`MAX_RATE`.
    """
    value = _parse_size(text.strip().removesuffix("/s"))
    if value > MAX_RATE:
        raise ValueError(f"{text!r} is more than the largest rate limit, 1T/s "
                         "(0 means unlimited)")
    return value


def parse_block_size(text: str | int, where: str) -> int:
    if isinstance(text, bool):
        raise ConfigError(f"{where}: block size {text!r} must be a size such as \"64K\"")
    try:
        value = text if isinstance(text, int) else _parse_size(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if value < MIN_BLOCK_SIZE or value > MAX_BLOCK_SIZE or value & (value - 1):
        raise ConfigError(
            f"{where}: block size {text!r} must be a power of two from 4K to 64M"
        )
    return value


def load_file(path: Path) -> dict[str, Any]:
    """Read and type-check a config file; raise ConfigError naming file and key."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:  # TOML is UTF-8; tomllib lets this one through
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None
    for key in raw:
        if key not in _KNOWN_KEYS:
            raise ConfigError(
                f"{path}: unknown key {key!r} (known: {', '.join(sorted(_KNOWN_KEYS))})"
            )
    for key in ("mountpoint", "state_dir", "default_store"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{path}: key {key!r} must be a string")
    for key in ("mountpoint", "state_dir"):
        if key in raw:
            _check_path_text(raw[key], f"{path}: key {key!r}", empty_ok=True)
    for key in ("allow_other", "cbt"):
        if key in raw and not isinstance(raw[key], bool):
            raise ConfigError(f"{path}: key {key!r} must be true or false")
    if "block_size" in raw and (
        isinstance(raw["block_size"], bool) or not isinstance(raw["block_size"], str | int)
    ):
        raise ConfigError(f"{path}: key 'block_size' must be a size such as \"64K\"")
    stores = raw.get("stores", {})
    if not isinstance(stores, dict):
        raise ConfigError(f"{path}: [stores] must be a table of name = \"directory\"")
    for name, directory in stores.items():
        if not isinstance(directory, str):
            raise ConfigError(f"{path}: key 'stores.{name}' must be a directory path string")
        _check_path_text(directory, f"{path}: key 'stores.{name}'")
    return raw


def _check_path_text(text: str, where: str, *, empty_ok: bool = False) -> None:
    """A path from a config file: not empty (that would mean the current directory), no NUL."""
    if not text and not empty_ok:
        raise ConfigError(f"{where} must not be empty")
    if "\0" in text:
        raise ConfigError(f"{where} must not contain NUL")


def _check_apart(places: list[tuple[str, Path]], where: str) -> None:
    """No two of *places* (``(label, path)``) may be one directory, or one inside the other.

    Real paths are compared (symlinks resolved), in both directions: a
    mountpoint inside a store would make the daemon serve its own mount and
    deadlock on it, a state directory inside a store would be an entry, a
    store inside another would be served twice.
    """
    real = [(label, path, Path(os.path.realpath(path))) for label, path in places]
    for i, (label, path, resolved) in enumerate(real):
        for other_label, other_path, other_resolved in real[i + 1 :]:
            if resolved == other_resolved:
                raise ConfigError(
                    f"{where}: {label} and {other_label} are the same directory ({path})")
            if other_resolved in resolved.parents:
                raise ConfigError(
                    f"{where}: {label} ({path}) lies inside {other_label} ({other_path})")
            if resolved in other_resolved.parents:
                raise ConfigError(
                    f"{where}: {other_label} ({other_path}) lies inside {label} ({path})")


def build_config(
    *,
    config_file: Path | None,
    mountpoint: str | None,
    stores: list[str],
    default_store: str | None,
    state_dir: str | None,
    block_size: str | None,
    allow_other: bool | None,
    cbt: bool | None = None,
) -> Config:
    """Merge a config file (if any) with flags; flags win. Validate everything."""
    raw: dict[str, Any] = load_file(config_file) if config_file else {}
    where = str(config_file) if config_file else "command line"

    store_map: dict[str, str] = dict(raw.get("stores", {}))
    flagged: set[str] = set()
    for spec in stores:
        name, sep, directory = spec.partition("=")
        if not sep or not directory:
            raise ConfigError(f"--store {spec!r}: expected NAME=DIRECTORY")
        if name in flagged:  # a flag overrides the file; two flags are a mistake
            raise ConfigError(f"--store {name!r} is given twice")
        flagged.add(name)
        store_map[name] = directory
    for name in store_map:
        _check_store_name(name, where)
    if not store_map:
        raise ConfigError(f"{where}: no stores given (use --store NAME=DIR or a [stores] table)")

    mp = mountpoint or raw.get("mountpoint")
    if not mp:
        raise ConfigError(f"{where}: no mountpoint given")
    sd = state_dir or raw.get("state_dir")
    if not sd:
        raise ConfigError(f"{where}: no state directory given (--state-dir or state_dir)")

    default = default_store or raw.get("default_store")
    if default is None:
        if len(store_map) != 1:
            raise ConfigError(f"{where}: several stores and no default_store named")
        default = next(iter(store_map))
    if default not in store_map:
        raise ConfigError(
            f"{where}: default_store {default!r} is not one of the stores "
            f"({', '.join(sorted(store_map))})"
        )

    bs = block_size if block_size is not None else raw.get("block_size", DEFAULT_BLOCK_SIZE)
    bs_where = "--block-size" if block_size is not None else f"{where}: key 'block_size'"
    remote_stores = {name: parse_spec(name, d) for name, d in store_map.items()
                     if is_remote_spec(d)}
    resolved_stores = {name: Path(os.path.abspath(d)) for name, d in store_map.items()
                       if name not in remote_stores}
    resolved_mp = Path(os.path.abspath(mp))
    resolved_sd = Path(os.path.abspath(sd))
    _check_apart(
        [(f"store {name!r}", d) for name, d in sorted(resolved_stores.items())]
        + [("the mountpoint", resolved_mp), ("the state directory", resolved_sd)],
        where,
    )
    return Config(
        mountpoint=resolved_mp,
        state_dir=resolved_sd,
        stores=resolved_stores,
        default_store=default,
        block_size=parse_block_size(bs, bs_where),
        allow_other=bool(allow_other if allow_other is not None else raw.get("allow_other", False)),
        cbt=bool(cbt if cbt is not None else raw.get("cbt", True)),
        source=where,
        remote_stores=remote_stores,
    )


def check_directories(config: Config) -> None:
    """Check that every store is an existing directory; raise ConfigError."""
    for name, d in sorted(config.stores.items()):
        if not d.exists():
            raise ConfigError(f"store {name!r}: directory {d} does not exist")
        if not d.is_dir():
            raise ConfigError(f"store {name!r}: {d} is not a directory")
