"""Argument checks shared by the Python API: one place, so every entry point says the same thing.

Each raises a one-line error naming the argument, what it got and what it takes. `bool` is refused
where a number is expected: `True` is an int to Python, but `steps=True` is always a mistake.
"""
import math
import numbers
import os

import torch


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


def kind(value):
    """How an error names what it got: "None", or the type's name."""
    return "None" if value is None else type(value).__name__


def instance(name, value, cls, what):
    """`value` an instance of `cls` (a class or a tuple of them) -> value; else TypeError saying `what` it must be."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, not {kind(value)}")
    return value


def string(name, value):
    """A str (a prompt) -> value; else TypeError (None, a list, bytes ...)."""
    return instance(name, value, str, "a string")


def model(name, sd):
    """A loaded `StableDiffusion` (sdlens.load(...)) -> sd; else TypeError, instead of an AttributeError later."""
    from .pipeline import StableDiffusion
    return instance(name, sd, StableDiffusion, "a StableDiffusion model, e.g. sdlens.load()")


def path(name, value):
    """A file path (str, bytes, os.PathLike) or an open binary file -> value; else TypeError."""
    if isinstance(value, (str, bytes, os.PathLike)) or hasattr(value, "read"):
        return value
    raise TypeError(f"{name} must be a file path or an open file, not {kind(value)}")


def tensor(name, x, what="a torch.Tensor"):
    return instance(name, x, torch.Tensor, what)


def tensor_shape(name, x, shape, expected=None):
    """A tensor of len(shape) dimensions whose sizes equal the ints of `shape` (None: any size) -> x; else
    TypeError (not a tensor) or ValueError with the shape given and `expected` ("[B, 4, h, w]"; by default
    `shape` written with * for any size). Shape only: no read of the data, so cheap anywhere."""
    expected = expected or "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    tensor(name, x, f"a {expected} tensor")
    if x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        raise ValueError(f"{name} must be a {expected} tensor, got shape {tuple(x.shape)}")
    return x


def finite_tensor(name, x):
    """A tensor with no NaN or inf -> x; else TypeError (not a tensor) or ValueError. It reads the data
    (on a GPU, a wait for it): check where data enters the API, once, never at every step."""
    return finite_tensors(name, [x], indexed=False)[0]


def finite_tensors(name, xs, indexed=True):
    """A list of tensors with no NaN or inf -> xs; the error names the first bad one, `name[i]`.
    One wait for the device for the whole list, not one per tensor."""
    for i, x in enumerate(xs):
        tensor(f"{name}[{i}]" if indexed else name, x)
    floats = [(i, x) for i, x in enumerate(xs) if x.is_floating_point() or x.is_complex()]
    if not floats:
        return xs
    bad = torch.stack([~torch.isfinite(x).all() for _, x in floats])
    if bool(bad.any()):
        i, x = floats[int(bad.int().argmax())]
        n = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{f'{name}[{i}]' if indexed else name} holds NaN or inf ({n} of {x.numel()} values); "
                         f"give finite values")
    return xs


def _range(lo, hi):
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return " >= 0" if lo == 0 else (" >= 1" if lo == 1 else f" >= {lo}")
    return f" <= {hi}" if hi is not None else ""
