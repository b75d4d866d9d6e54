"""Byte budgets as people write them: '24GiB', '512M', '1000000'."""

import re

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20}
_UNITS.update({"G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40})


def parse_bytes(text):
    """'24GiB', '512M', '1000000' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 24GiB, 512MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
