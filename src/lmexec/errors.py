"""The one exception type for mistakes a user can fix (bad input, bad flags, bad files).

The CLI turns it into a one-line ``error: ...`` message and exit code 2; anything else is a bug and
keeps its traceback.
"""

from collections import Counter
from collections.abc import Sequence


class UserError(ValueError):
    """Raised for invalid user input; the message must name the problem and how to fix it."""


def check_seed(seed: int, flag: str = "--seed") -> int:
    """A seed torch's generators take (a signed 64-bit integer >= 0), or a UserError naming ``flag``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UserError(f"{flag} must be a whole number in 0..2**63-1, got {seed!r}")
    return seed


def check_distinct(flag: str, values: Sequence[object]) -> None:
    """Refuse a list flag that names a value twice: its rows would repeat, or one row would pool the
    samples of two runs."""
    twice = sorted(str(v) for v, count in Counter(values).items() if count > 1)
    if twice:
        raise UserError(f"{flag} lists {', '.join(twice)} more than once")
