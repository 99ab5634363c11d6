"""The one exception type for bad user input.

Every check of user input (data files, flags, configs) raises :class:`UserError` with a one-line
message that names the problem; the CLI prints it on stderr and exits non-zero, without a traceback.
"""

import math


class UserError(ValueError):
    """Bad input from the user: a missing file, a malformed line, a parameter out of range."""


def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False) -> None:
    """Raise :class:`UserError` unless ``low (<|<=) value (<|<=) high`` (NaN is in no range); the message
    gives the range."""
    not_a_number = isinstance(value, float) and math.isnan(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not_a_number or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise UserError(f"{name} must be in {left}{lo}, {hi}{right}, got {value}")


def check_choice(name: str, value, choices) -> None:
    """Raise :class:`UserError` unless ``value`` is one of ``choices``; the message lists them."""
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
