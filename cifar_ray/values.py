"""One rule for the values users write: in a config, a space, a model's parameters, a layer
spec, and for the numbers read back from files.

- A bool is not a number: Python counts True as 1, a user never means it.
- PyYAML reads YAML 1.1, which takes `1e-3` (an exponent without a dot, or without a sign)
  for text: text written as a number with an exponent is read as that number.
- A float must be finite and the number written: 1e-400 is not 0, 1e999 not infinity, and
  an integer beyond any float is no float.

Each check raises `bad(expected)`, where `expected` says what the value must be ("an
integer"); the caller's `bad` names the key, flag or file it came from.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

# A YAML 1.2 float with an exponent: the notation YAML 1.1 may leave as text.
_EXPONENT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_finite(x: Any) -> bool:
    """A number that is not inf or nan (every int is: isfinite(10**400) would overflow)."""
    return is_number(x) and (isinstance(x, int) or math.isfinite(x))


def rounds_away(text: str, number: float) -> bool:
    """True when the number written as `text` is not the float it became: a nonzero one
    that rounds to 0 (1e-400) or a finite one that overflows to infinity (1e400)."""
    mantissa = text.strip().lower().split("e")[0]
    if number == 0:
        return any(c in "123456789" for c in mantissa)
    return number in (float("inf"), float("-inf")) and "inf" not in text.lower()


def finite_number(value: Any, bad: Callable[[str], Exception]) -> float:
    """`value` as a finite float: a number, or text with an exponent (`1e-3`, see above);
    else `bad(expected)` raised."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        number = float(value)
        if rounds_away(value, number):
            raise bad("a number a float can hold (it rounds to 0 or to infinity)")
        value = number
    if not is_number(value):
        raise bad("a number")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        raise bad("a finite number") from None
    if not math.isfinite(value):
        raise bad("a finite number")
    return value


def typed(tp: type, value: Any, bad: Callable[[str], Exception]) -> Any:
    """`value` checked as a `tp` (bool, int, float or str) and returned as one (an int is
    fine where a float is expected, a bool never); else `bad(expected)` raised."""
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif tp is int:
        if not is_int(value):
            raise bad("an integer")
    elif tp is float:
        return finite_number(value, bad)
    elif tp is str:
        if not isinstance(value, str):
            raise bad("a string")
    else:
        raise TypeError(f"no check for {tp!r}")
    return value


TYPES = (bool, int, float, str)  # what `typed` checks
