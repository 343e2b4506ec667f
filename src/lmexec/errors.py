"""The one exception type for mistakes a user can fix (bad input, bad flags, bad files).

The CLI turns it into a one-line ``error: ...`` message and exit code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(ValueError):
    """Raised for invalid user input; the message must name the problem and how to fix it."""
