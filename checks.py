"""Argument checks shared by the Python API: one place, so every entry point says the same thing.

Each raises a one-line error naming the argument, what it got and what it takes. `bool` is refused
where a number is expected: `True` is an int to Python, but `steps=True` is always a mistake.
"""
import math
import numbers


def whole(name, value, lo=None, hi=None, hint="", not_int=ValueError):
    """An integer in [lo, hi] (either bound may be None) -> int; else ValueError. A value that is not an
    integer at all raises `not_int`: ValueError by default (a count given as 2.0, "2" or True is a wrong
    value of the right argument); TypeError where an API has always said so."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise not_int(f"{name} must be a whole number{_range(lo, hi)}{hint}, not {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be a whole number{_range(lo, hi)}{hint}, got {value!r}")
    return int(value)


def number(name, value, lo=None, hi=None, hint=""):
    """A finite real number in [lo, hi] -> float; else TypeError (not a number) or ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number{_range(lo, hi)}{hint}, not {value!r}")
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be a finite number{_range(lo, hi)}{hint}, got {value!r}")
    return float(value)


def fraction(name, value):
    """A number in [0, 1]."""
    return number(name, value, 0, 1)


def flag(name, value):
    """True or False, and nothing else (not 0, 1 or "yes")."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def _range(lo, hi):
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return " >= 0" if lo == 0 else (" >= 1" if lo == 1 else f" >= {lo}")
    return f" <= {hi}" if hi is not None else ""
