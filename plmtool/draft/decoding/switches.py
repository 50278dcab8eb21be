"""Environment switches of the GPU decoding path, for bisecting a device fault without code edits.

    PLMTOOL_CUDA_GRAPHS=0     no CUDA graphs at all (target steps and drafter step run eagerly)
    PLMTOOL_DRAFTER_GRAPH=0   the drafter step runs eagerly (target steps may still be captured)
    PLMTOOL_STATIC_DRAFTER=0  no fixed-shape drafter step at all: the drafter's variable-shape
                              eager `step` with a fresh cache per request
    PLMTOOL_COMPILE=0         never torch.compile the target step
    PLMTOOL_GREEDY_LOOP=0     greedy decoding takes the general loop (verdict read before the
                              host launches compaction and drafting) instead of greedy_loop.py
    PLMTOOL_PREFILL_GRAPHS=0  prompts are prefilled eagerly (the target's and the drafter's
                              prefill) instead of through the padded prefill graphs (prefill.py)
    PLMTOOL_SYNC_CHECK=1      synchronise after every graph replay and eager drafter step, so a
                              device fault is reported by the program that caused it (slower)

An unset variable leaves the caller's choice; `0/false/no/off` and `1/true/yes/on` are read.
"""

from __future__ import annotations

import os

_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


def env_flag(name: str) -> bool | None:
    """True / False when the variable is set to a recognised value, None when unset or empty."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in _FALSE:
        return False
    if raw in _TRUE:
        return True
    raise ValueError(f"{name}={os.environ[name]!r}: expected one of {', '.join(_TRUE + _FALSE)}")


def allowed(name: str, wanted: bool) -> bool:
    """`wanted` unless the environment turns the feature off (the environment never forces it on
    where the caller did not ask for it)."""
    return bool(wanted) and env_flag(name) is not False


def sync_check() -> bool:
    return env_flag("PLMTOOL_SYNC_CHECK") is True
