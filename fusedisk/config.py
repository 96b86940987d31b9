"""Datastore configuration: a TOML file, overridden by command-line flags.

Every error names the file, the key and what is wrong, in one line.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .sizes import parse_size

DEFAULT_BLOCK_SIZE = 64 << 10
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 64 << 20

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


def _check_store_name(name: str, where: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
        raise ConfigError(
            f"{where}: store name {name!r} must be letters, digits, '-', '_' or '.', "
            "not starting with '.'"
        )


def parse_block_size(text: str | int, where: str) -> int:
    try:
        value = text if isinstance(text, int) else parse_size(text)
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
    for key in ("allow_other", "cbt"):
        if key in raw and not isinstance(raw[key], bool):
            raise ConfigError(f"{path}: key {key!r} must be true or false")
    if "block_size" in raw and not isinstance(raw["block_size"], str | int):
        raise ConfigError(f"{path}: key 'block_size' must be a size such as \"64K\"")
    stores = raw.get("stores", {})
    if not isinstance(stores, dict):
        raise ConfigError(f"{path}: [stores] must be a table of name = \"directory\"")
    for name, directory in stores.items():
        if not isinstance(directory, str):
            raise ConfigError(f"{path}: key 'stores.{name}' must be a directory path string")
    return raw


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
    for spec in stores:
        name, sep, directory = spec.partition("=")
        if not sep or not directory:
            raise ConfigError(f"--store {spec!r}: expected NAME=DIRECTORY")
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
    resolved_stores = {name: Path(os.path.abspath(d)) for name, d in store_map.items()}
    resolved_mp = Path(os.path.abspath(mp))
    resolved_sd = Path(os.path.abspath(sd))
    seen: dict[Path, str] = {}
    for name, d in resolved_stores.items():
        if d in seen:
            raise ConfigError(f"{where}: stores {seen[d]!r} and {name!r} are the same directory")
        seen[d] = name
        if d == resolved_mp or resolved_mp in d.parents:
            raise ConfigError(f"{where}: store {name!r} ({d}) lies inside the mountpoint")
    if resolved_sd == resolved_mp or resolved_mp in resolved_sd.parents:
        raise ConfigError(f"{where}: the state directory lies inside the mountpoint")
    return Config(
        mountpoint=resolved_mp,
        state_dir=resolved_sd,
        stores=resolved_stores,
        default_store=default,
        block_size=parse_block_size(bs, bs_where),
        allow_other=bool(allow_other if allow_other is not None else raw.get("allow_other", False)),
        cbt=bool(cbt if cbt is not None else raw.get("cbt", True)),
        source=where,
    )


def check_directories(config: Config) -> None:
    """Check that every store is an existing directory; raise ConfigError."""
    for name, d in sorted(config.stores.items()):
        if not d.exists():
            raise ConfigError(f"store {name!r}: directory {d} does not exist")
        if not d.is_dir():
            raise ConfigError(f"store {name!r}: {d} is not a directory")
