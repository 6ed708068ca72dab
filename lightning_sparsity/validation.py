r"""Argument checks with one message template, shared by every public entry point.

Every error reads ``\`Owner(arg=value)\`: expected <what>, got <what came>. HINT: <the fix>``: it
names the callable, the argument, the value, what was expected and, where one exists, the fix.
No Lightning import (the functional and pruning layers use it too).

Example::

    >>> check_float(-1.0, owner="FilterThresholding", arg="cap", low=0.0)
    Traceback (most recent call last):
    ...
    ValueError: `FilterThresholding(cap=-1.0)`: expected `cap` finite and >= 0, got -1.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any, NoReturn, TypeVar

from torch import Tensor

T = TypeVar("T")

#: A strength: a float >= 0, or a schedule ``epoch -> float`` evaluated at every epoch start.
Strength = float | Callable[[int], float]


def describe(value: Any) -> Any:
    """A run-independent description of an argument (a callable by name, not by address)."""
    if callable(value) and not isinstance(value, type):
        return getattr(value, "__qualname__", type(value).__qualname__)
    return value


def message(
    owner: str, arg: str, value: Any, expected: str, got: Any = None, hint: str = ""
) -> str:
    r"""The one error message: ``\`owner(arg=value)\`: expected ..., got .... HINT: ...``.

    ``got`` defaults to ``repr(value)``; ``hint`` is appended after ``HINT:`` when given.
    """
    got = repr(value) if got is None else got
    text = f"`{owner}({arg}={describe(value)!r})`: expected {expected}, got {got}."
    return f"{text} HINT: {hint}" if hint else text


def fail(
    owner: str,
    arg: str,
    value: Any,
    expected: str,
    *,
    got: Any = None,
    hint: str = "",
    error: type[Exception] = ValueError,
) -> NoReturn:
    """Raise ``error`` with [`message`][lightning_sparsity.validation.message]."""
    raise error(message(owner, arg, value, expected, got, hint))


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_bool(value: Any, *, owner: str, arg: str) -> bool:
    """``value`` if it is a bool, else a ``TypeError``."""
    if not isinstance(value, bool):
        fail(owner, arg, value, "a bool", got=_type_name(value), error=TypeError)
    return value


def check_float(
    value: Any,
    *,
    owner: str,
    arg: str,
    low: float | None = None,
    high: float | None = None,
    strict_low: bool = False,
    strict_high: bool = False,
    hint: str = "",
) -> float:
    """A finite real number (bools rejected) within the given bounds, as a float."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(owner, arg, value, f"`{arg}` to be a float", got=_type_name(value), error=TypeError)
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if strict_low else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if strict_high else '<='} {high:g}")
    expected = f"`{arg}` finite" + (" and " + " and ".join(bounds) if bounds else "")
    if not math.isfinite(value):
        fail(owner, arg, value, expected, hint=hint)
    too_low = low is not None and (value <= low if strict_low else value < low)
    too_high = high is not None and (value >= high if strict_high else value > high)
    if too_low or too_high:
        fail(owner, arg, value, expected, hint=hint)
    return float(value)


def check_int(value: Any, *, owner: str, arg: str, low: int | None = None, hint: str = "") -> int:
    """An int (bools rejected) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(owner, arg, value, f"`{arg}` to be an int", got=_type_name(value), error=TypeError)
    if low is not None and value < low:
        fail(owner, arg, value, f"`{arg}` >= {low}", hint=hint)
    return value


def check_choice(value: Any, choices: Collection[T], *, owner: str, arg: str, hint: str = "") -> T:
    """``value`` if it is one of ``choices`` (listed in the message), else a ``ValueError``."""
    if not isinstance(value, str | int | float | type(None)) or value not in choices:
        fail(owner, arg, value, f"`{arg}` in {list(choices)}", hint=hint)
    return value  # type: ignore[return-value]


def check_optional(check: Callable[..., T], value: Any, **kwargs: Any) -> T | None:
    """``None``, or ``check(value, **kwargs)``."""
    return None if value is None else check(value, **kwargs)


def check_strength(value: Any, *, owner: str, arg: str = "strength") -> Strength:
    """A strength: a finite float >= 0, or a callable schedule (its values checked when called)."""
    if callable(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(
            owner,
            arg,
            value,
            f"`{arg}` to be a float >= 0 or a schedule `epoch -> float`",
            got=_type_name(value),
            error=TypeError,
        )
    return check_float(value, owner=owner, arg=arg, low=0.0)


def strength_at(strength: Strength, epoch: int, *, owner: str, arg: str = "strength") -> float:
    """The strength for ``epoch``; a schedule's value is checked like a float."""
    if not callable(strength):
        return float(strength)
    value = strength(epoch)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not ok or not math.isfinite(value) or value < 0:
        fail(
            owner,
            arg,
            strength,
            "the schedule's value to be a finite float >= 0",
            got=f"{value!r} at epoch {epoch}",
            error=ValueError if ok else TypeError,
        )
    return float(value)


def check_log_every(value: Any, *, owner: str) -> int | None:
    """``log_every_n_steps``: ``None`` (follow the Trainer's) or an int >= 0 (0: never)."""
    if value is None:
        return None
    return check_int(
        value,
        owner=owner,
        arg="log_every_n_steps",
        low=0,
        hint="0 logs no step, None follows `Trainer(log_every_n_steps=...)`.",
    )
