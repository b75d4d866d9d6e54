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


def normalize_budget(value):
    """A memory budget as people give it, in the form memengine keeps it: None; bytes (an int, or a size such as
    '24GiB', '512M', '1000000') as an int; or a share of the activations ('50%': keep half of them, recompute the
    rest) as its canonical string, resolved to bytes once the activations are measured (activation_share).
    ValueError naming the value otherwise."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().endswith("%"):
        share = activation_share(value.strip())
        return f"{share * 100:g}%"
    count = parse_bytes(value) if isinstance(value, str) else value
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(
            f"budget {value!r}: give a positive number of bytes, a size such as 24GiB, or a percentage of the "
            "activations such as 50%"
        )
    return count


def activation_share(budget):
    """The fraction of the activations a budget such as '50%' keeps (0.5), or None for a budget in bytes."""
    if not isinstance(budget, str) or not budget.strip().endswith("%"):
        return None
    try:
        percent = float(budget.strip()[:-1])
    except ValueError:
        percent = float("nan")
    if not 0 < percent <= 100:
        raise ValueError(f"budget {budget!r}: a percentage of the activations must be in (0, 100]")
    return percent / 100
