"""Byte sizes as people write them: one parser for every size the CLI takes, one formatter for every size it prints.

``parse_size`` accepts plain bytes (``4096``), binary suffixes ``K M G T`` / ``KiB MiB GiB TiB`` (powers of 1024:
``16G`` = ``16GiB`` = 17179869184, as systemd and most memory settings read them), SI suffixes ``KB MB GB TB``
(powers of 1000), an optional ``B`` (``512B``), a space before the unit and decimals that come to whole bytes
(``1.5G``). Units are case-insensitive.
"""

from __future__ import annotations

import argparse
import re
from decimal import Decimal, InvalidOperation

_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _UNITS[_p] = _UNITS[f"{_p}ib"] = 1024 ** _i
    _UNITS[f"{_p}b"] = 1000 ** _i
_SIZE = re.compile(r"\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-z]*)\s*", re.IGNORECASE)
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str | int) -> int:
    """Bytes in ``text`` (see the module doc); ``ValueError`` naming the accepted forms for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    match = _SIZE.fullmatch(str(text))
    unit = match["unit"].lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write bytes (4096) or a number with a unit such as 512M, 16G, "
                         f"16GiB, 1.5T or 10GB (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB of 1000)")
    try:
        value = Decimal(match["number"]) * _UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the regular expression only lets numbers through
        raise ValueError(f"{text!r} is not a size") from None
    if value != value.to_integral_value():
        raise ValueError(f"size {text!r} is not a whole number of bytes ({value})")
    return int(value)


def size_arg(text: str) -> int:
    """``parse_size`` as an argparse ``type=`` (its error becomes a usage error, exit code 2)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(n: float) -> str:
    """``17179869184`` -> ``"16.0 GiB"``; bytes below 1 KiB stay exact (``"512 B"``)."""
    for unit in _BINARY:
        if abs(n) < 1024 or unit == _BINARY[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
