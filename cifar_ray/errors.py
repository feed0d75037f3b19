"""The one exception type for bad user input.

Library code raises `UserError` with a message that names the file, key or flag at fault
and says what to do; the CLI prints it as one line and exits with status 2. Anything else
that escapes is a bug and keeps its traceback.
"""

import re


class UserError(Exception):
    """Bad input from the user: a file, a flag, a config key, a spec, a space."""


def shown(value, limit: int = 100) -> str:
    """`value` for a message: its repr, cut short. A YAML alias can make a small file hold
    a structure of billions of shared items, whose full repr would never finish."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def quote(error, limit: int = 240) -> str:
    """A library's message (an exception or its text) for an error line: its first line,
    terminal colours removed, and if longer than `limit`, cut at the end of its last whole
    sentence (else of a word, with "..."), never mid-sentence without saying so."""
    text = _ANSI.sub("", str(error))
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(error).__name__
    if len(line) <= limit:
        return line
    head = line[:limit]
    end = max(head.rfind(". "), head.rfind("; "))
    return head[:end + 1] if end > 0 else head.rsplit(" ", 1)[0] + " ..."


def _short_repr():
    import reprlib

    r = reprlib.Repr()
    r.maxlevel = 3
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 5
    r.maxstring = r.maxother = r.maxlong = 60
    return r


_REPR = _short_repr()
