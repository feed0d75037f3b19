"""The one exception type for bad user input.

Library code raises `UserError` with a message that names the file, key or flag at fault
and says what to do; the CLI prints it as one line and exits with status 2. Anything else
that escapes is a bug and keeps its traceback.
"""

import math


class UserError(Exception):
    """Bad input from the user: a file, a flag, a config key, a spec, a space."""


def shown(value, limit: int = 100) -> str:
    """`value` for a message: its repr, cut short. A YAML alias can make a small file hold
    a structure of billions of shared items, whose full repr would never finish."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def finite_number(value, bad) -> float:
    """`value` as a finite float, else `bad(expected)` raised: for a bool, a non-number, an
    integer beyond any float, inf or nan."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad("a number")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        raise bad("a finite number") from None
    if not math.isfinite(value):
        raise bad("a finite number")
    return value


def _short_repr():
    import reprlib

    r = reprlib.Repr()
    r.maxlevel = 3
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 5
    r.maxstring = r.maxother = r.maxlong = 60
    return r


_REPR = _short_repr()
