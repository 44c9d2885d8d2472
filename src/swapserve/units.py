"""Units that operators write: durations, percents of traffic, basis points. One grammar each.

Every file and flag that takes a duration (rollout plans, monitoring.yaml, CLI options) and every
one that takes a traffic percent parses it here, so ``1h30m`` or ``33.33`` means the same thing
everywhere::

    >>> parse_duration("1h30m"), parse_duration("500ms"), parse_duration(90)
    (5400.0, 0.5, 90.0)
    >>> percent_to_bp("33.33"), bp_to_percent(3333)
    (3333, 33.33)

The parsers raise :class:`UnitError` (a ``ValueError``) saying what is wrong and which forms are
accepted, but not *where*: the caller knows the field and wraps the message in its own error
(``InvalidInput`` for a rollout plan, ``ConfigError`` for monitoring.yaml, an argparse error for a
flag), so every message names the field and the fix.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

#: Basis points in 100 %. Traffic is stored and routed exactly in these units (one bp = 0.01 %).
BASIS_POINTS = 10_000

#: Seconds per duration unit.
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: One amount with its unit; a duration is one or more of these (``1h30m``, ``2h 5m 3s``).
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)")
#: What the duration errors tell the operator to write instead.
DURATION_FORMS = "use seconds or a number with s, m or h (also ms and d), e.g. 90, 90s, 500ms, 10m, 1h30m"


class UnitError(ValueError):
    """A value that is not a duration or percent; the message says what is wrong and the accepted forms."""


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``90.5``, ``"90"``, ``"90s"``, ``"500ms"``, ``"10m"``, ``"1h30m"``, ``"1.5h"``, ``"1d"``.

    A bare number (or numeric string) is seconds. Always returns a finite float >= 0; raises
    UnitError otherwise (booleans, negative or non-finite values, unknown units, stray text).
    """
    if isinstance(value, bool):
        raise UnitError(f"expected a duration, got {value!r}; {DURATION_FORMS}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float: YAML and JSON read 1 followed by 400 zeros as one
            raise UnitError(f"expected a finite duration >= 0, got an integer of {len(str(abs(value)))} digits; "
                            f"{DURATION_FORMS}") from None
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or _DURATION_PART.sub("", text).strip():
                raise UnitError(f"expected a duration, got {value!r}; {DURATION_FORMS}") from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise UnitError(f"expected a duration, got {value!r}; {DURATION_FORMS}")
    if not math.isfinite(seconds) or seconds < 0:
        raise UnitError(f"expected a finite duration >= 0, got {value!r}; {DURATION_FORMS}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact label with one unit: ``5m``, ``1h``, ``30s``, ``1d``, else milliseconds (``1500ms``).

    ``parse_duration(format_duration(s)) == s`` for whole milliseconds.
    """
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"


def percent_to_bp(value: object) -> int:
    """Exact basis points from a percent 0..100 with at most two decimals: ``"33.33"`` -> 3333, ``"7%"`` -> 700.

    Decimal arithmetic, never float: every ``bp / 100`` printed back parses to the same bp.
    Raises UnitError for anything else (text that is not a number, outside 0..100, a third decimal).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnitError(f"{value!r} is not a percent; give a number from 0 to 100 (e.g. 95 or 33.33)")
    if isinstance(value, int) and not 0 <= value <= 100:  # before str(): a huge int has no decimal text
        raise UnitError(f"{value if abs(value) < 10 ** 20 else 'a huge number'} is outside 0..100; "
                        "give a percent between 0 and 100")
    try:
        d = Decimal(str(value).strip().removesuffix("%").strip())
    except InvalidOperation:
        d = Decimal("nan")
    if not d.is_finite():
        raise UnitError(f"{value!r} is not a percent; give a number from 0 to 100 (e.g. 95 or 33.33)")
    if d < 0 or d > 100:
        raise UnitError(f"{value!r} is outside 0..100; give a percent between 0 and 100")
    bp = d * 100
    if bp != bp.to_integral_value():
        raise UnitError(f"{value!r} has more than two decimals; round it to 0.01% (one basis point)")
    return int(bp)


def bp_to_percent(bp: int) -> int | float:
    """The percent for ``bp``: an int when whole (``5000`` -> 50), else a float (``3333`` -> 33.33)."""
    return bp // 100 if bp % 100 == 0 else bp / 100


__all__ = ["BASIS_POINTS", "DURATION_FORMS", "UnitError", "bp_to_percent", "format_duration", "parse_duration",
           "percent_to_bp"]
