"""The one exception type for bad user input.

Library code raises `UserError` with a message that names the file, key or flag at fault
and says what to do; the CLI prints it as one line and exits with status 2. Anything else
that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a file, a flag, a config key, a spec, a space."""
