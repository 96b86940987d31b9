"""Parsing and printing of byte sizes ("64K", "1.5G", "4096")."""

from __future__ import annotations

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Return the number of bytes *text* names; binary units, optional ``iB``/``B``.

    Raises ``ValueError`` with a message fit for the operator.
    """
    s = text.strip().upper()
    for suffix in ("IB", "B"):
        if s.endswith(suffix) and len(s) > len(suffix) and s[-len(suffix) - 1] in "KMGTP":
            s = s[: -len(suffix)]
            break
    unit = s[-1:] if s[-1:] in _UNITS and s[-1:] != "" and not s[-1:].isdigit() else ""
    number = s[: len(s) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 64K, 1M, 2G)") from None
    if value < 0 or value != value:
        raise ValueError(f"{text!r} is not a size (it must be zero or more)")
    if value * _UNITS[unit] >= 1 << 63:  # also inf and 1e400
        raise ValueError(f"{text!r} is not a size (too large)")
    return int(value * _UNITS[unit])


def format_size(nbytes: float) -> str:
    """Return *nbytes* in the largest binary unit that keeps the number ≥ 1."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def block_span(offset: int, length: int, shift: int) -> tuple[int, int]:
    """(first block, number of blocks) of the blocks of ``1 << shift`` bytes that the
    byte range ``[offset, offset + length)`` touches; *length* must be positive."""
    first = offset >> shift
    return first, ((offset + length - 1) >> shift) - first + 1
