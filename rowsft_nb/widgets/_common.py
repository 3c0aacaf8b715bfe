"""Small helpers shared by the explorers: number formatting, layer/type keys, a guarded
setter that turns a refused control change into a message.

Usage::

    human_count(6_738_415_616)     # '6.74 B'
    human_bytes(3 * 2**30)         # '3.00 GiB'
"""
from __future__ import annotations

from typing import Callable

from ..targets import layer_index, module_type


def human_count(n: float) -> str:
    """``1234567 -> '1.23 M'``; small numbers are printed whole."""
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(round(n)):,}"


def human_bytes(n: float) -> str:
    """``3 * 2**30 -> '3.00 GiB'``."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def layer_key(name: str) -> int:
    """Block index of a module, -1 for modules outside the repeated blocks."""
    idx = layer_index(name)
    return -1 if idx is None else idx


def layer_label(key: int) -> str:
    return "other" if key < 0 else f"layer {key}"


def types_in_order(names: list[str]) -> list[str]:
    """Distinct :func:`module_type` values in first-seen order."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(module_type(n), None)
    return list(seen)


def apply_or_message(change: Callable[[], None], show: Callable[[str], None]) -> bool:
    """Run a state change; on ``ValueError`` show its message instead of raising.
    Returns True when the change was accepted. Views use it so a refused control
    setting leaves the state as it was and tells the user why."""
    try:
        change()
    except ValueError as err:
        show(str(err))
        return False
    show("")
    return True
