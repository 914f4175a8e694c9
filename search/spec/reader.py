"""Reading one spec value: the :class:`Reader` that raises one :class:`SpecError` naming the
file, field path and value, :func:`read_dim` (a fixed or searched value, each possible value
checked) and the small checks the section parsers share (``int_check``, ``one_of``, ...).

The section parsers are :mod:`search.spec.parse` (top-level sections) and
:mod:`search.spec.arch` (``space``); both build on this module.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, NoReturn

from search.spec.dims import Choice, FloatRange, IntRange, is_int, is_number
from search.spec.model import SpecError
from trainables.arch import ArchError

__all__ = [
    "Reader",
    "annotation_kind",
    "arch_check",
    "bool_check",
    "expected_of",
    "freeze",
    "int_check",
    "number_check",
    "one_of",
    "read_dim",
]


class Reader:
    """Validation helpers that raise one SpecError prefixed with the file name."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> NoReturn:
        sep = "" if message.startswith("=") else " "
        raise SpecError(f"{self.source}: {path or '<top level>'}{sep}{message}")

    def invalid(self, path: str, value: Any, allowed: str) -> NoReturn:
        hint = ""
        if isinstance(value, str) and _parses_as_float(value):
            # YAML 1.1 (PyYAML) reads 1e-5 and 1e6 as strings: only 1.0e-5 is a float.
            hint = " (YAML reads it as text: write 0.00001 / 1000000, or 1.0e-5)"
        self.fail(path, f"={value!r} is invalid: expected {allowed}{hint}")

    def mapping(self, d: Any, path: str, known: Sequence[str]) -> dict[str, Any]:
        """``d`` as a dict whose keys are all in ``known`` (else the closest key is suggested)."""
        if d is None:
            return {}
        if not isinstance(d, Mapping):
            self.invalid(path, d, "a mapping of " + ", ".join(known))
        for k in d:
            if k not in known:
                close = difflib.get_close_matches(str(k), known, n=1)
                hint = f": did you mean {close[0]!r}?" if close else ""
                self.fail(f"{path}.{k}" if path else str(k),
                          f"is not a known key{hint} (expected one of {', '.join(known)})")
        return dict(d)

    def dataclass(self, cls: type, d: Any, path: str, checks: Mapping[str, Callable[[Any], str | None]]) -> Any:
        """An instance of the flat section dataclass ``cls``; ``checks`` return what is allowed."""
        names = [f.name for f in fields(cls)]
        kw = self.mapping(d, path, names)
        for k, v in kw.items():
            allowed = checks[k](v)
            if allowed is not None:
                self.invalid(f"{path}.{k}", v, allowed)
        return cls(**kw)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def int_check(lo: int, *, nullable: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if (v is None and nullable) or (is_int(v) and v >= lo):
            return None
        return f"an integer >= {lo}" + (" or null" if nullable else "")

    return check


def number_check(lo: float, *, lo_open: bool) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if is_number(v) and (v > lo if lo_open else v >= lo):
            return None
        return f"a number {'>' if lo_open else '>='} {lo}"

    return check


def one_of(choices: Sequence[Any]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = any(v == c and type(v) is type(c) for c in choices)
        return None if ok else "one of " + ", ".join(map(str, choices))

    return check


# ---------------------------------------------------------------------- searched values
def read_dim(
    r: Reader,
    v: Any,
    path: str,
    kind: str,
    check: Callable[[Any], str | None],
) -> Any:
    """A fixed value or a searched one, each possible value validated by ``check``.

    ``kind`` is the field's type: "int" and "float" allow the matching range, "cat" only
    fixed values and choices. ``check`` returns None when a value is fine, else what is allowed.
    """
    if not isinstance(v, Mapping):
        allowed = check(v)
        if allowed is not None:
            r.invalid(path, v, allowed)
        return freeze(v)
    keys = ("choice", "int", "float", "step", "log")
    d = r.mapping(v, path, keys)
    kinds = [k for k in ("choice", "int", "float") if k in d]
    if len(kinds) != 1:
        r.invalid(path, v, "a fixed value or exactly one of {choice: [...]}, {int: [lo, hi]}, "
                  "{float: [lo, hi]}")
    k = kinds[0]
    extra = sorted(set(d) - {k, *(("step", "log") if k == "int" else ("log",) if k == "float" else ())})
    if extra:
        r.fail(f"{path}.{extra[0]}", f"is not allowed with {k} (only with "
               f"{'int' if extra[0] == 'step' else 'int or float'})")
    if k == "choice":
        values = d["choice"]
        if not isinstance(values, list) or not values:
            r.invalid(f"{path}.choice", values, "a non-empty list of values")
        frozen = [freeze(x) for x in values]
        for i, x in enumerate(values):
            if frozen.index(frozen[i]) != i:
                r.invalid(f"{path}.choice[{i}]", x, "each value once (it is listed twice)")
            allowed = check(x)
            if allowed is not None:
                r.invalid(f"{path}.choice[{i}]", x, allowed)
        return Choice(tuple(frozen))
    if kind != k:
        want = {"int": "{int: [lo, hi]} or {choice: [...]}",
                "float": "{float: [lo, hi]} or {choice: [...]}",
                "cat": "a fixed value or {choice: [...]}"}[kind]
        r.invalid(path, v, f"{want} for this field")
    bounds = d[k]
    if not (isinstance(bounds, list) and len(bounds) == 2):
        r.invalid(f"{path}.{k}", bounds, "[lo, hi]")
    num_ok = is_int if k == "int" else is_number
    for i, b in enumerate(bounds):
        if not num_ok(b):
            r.invalid(f"{path}.{k}[{i}]", b, "an integer" if k == "int" else "a finite number")
        allowed = check(b)
        if allowed is not None:
            r.invalid(f"{path}.{k}[{i}]", b, allowed)
    lo, hi = bounds
    if lo > hi:
        r.invalid(f"{path}.{k}", bounds, f"[lo, hi] with lo <= hi ({lo} > {hi})")
    log = d.get("log", False)
    if not isinstance(log, bool):
        r.invalid(f"{path}.log", log, "true or false")
    if log and lo <= 0:
        r.invalid(f"{path}.{k}[0]", lo, "a number > 0 with log: true")
    if k == "float":
        return FloatRange(float(lo), float(hi), log)
    step = d.get("step", 1)
    if not (is_int(step) and step >= 1):
        r.invalid(f"{path}.step", step, "an integer >= 1")
    if log and step != 1:
        r.invalid(f"{path}.step", step, "1 with log: true (Optuna cannot combine them)")
    return IntRange(lo, hi, step, log)


def freeze(v: Any) -> Any:
    """Lists as tuples, so specs compare and hash by value."""
    return tuple(freeze(x) for x in v) if isinstance(v, list) else v


def expected_of(e: Exception) -> str:
    """What a config error says is allowed ("... is invalid: expected X" -> "X")."""
    msg = str(e)
    return msg.split(" is invalid: expected ", 1)[1] if " is invalid: expected " in msg else msg


def arch_check(build: Callable[[Any], Any]) -> Callable[[Any], str | None]:
    """Validate a value by building the ArchConfig part that holds it (one set of rules)."""

    def check(v: Any) -> str | None:
        try:
            build(v)
        except ArchError as e:
            return expected_of(e)
        except (TypeError, ValueError) as e:
            return str(e)
        return None

    return check


def bool_check(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def annotation_kind(cls: type, name: str) -> str:
    """"int", "float" or "cat" from a dataclass field's annotation (which range it allows)."""
    words = set(re.findall(r"\w+", str(next(f.type for f in fields(cls) if f.name == name))))
    return "float" if "float" in words else "int" if "int" in words else "cat"
