"""Run untrusted model-written Python (PAL programs, calculator expressions) safely and fast.

Three layers, each a backstop for the one before:

1. **Static allow-list** (parent process, cached by source). The program is parsed and every AST node must be of
   an allowed kind: arithmetic, comparisons, names, literals, assignments, ``if``/``for``/``while``, ``def``/``return``
   (nested defs and lambdas allowed), comprehensions, calls, subscripts. Rejected outright: classes, ``try``/``with``/
   ``raise``/``global``/``nonlocal``/``del``/``yield``/``await``/``async``/``match``, decorators, star-imports, and any
   import other than ``math`` / ``fractions``. Every name starting with ``_`` is rejected (the lone ``_`` throwaway
   loop variable is the one exception: it is neither a dunder nor a private name), as are the escape hatches
   ``eval``/``exec``/``open``/``getattr``/``type``/... . Attribute access is allow-listed *by attribute name*:
   the public names of ``math``, ``Fraction``, and a fixed set of harmless container/string/number methods that
   model-written programs use all the time (``append``, ``items``, ``split``, ``numerator``...). Frame/code/
   generator internals (``gi_frame``, ``f_globals``, ``mro``, ``format``...) are therefore unreachable.
   Obviously huge constant powers/repeats (``10**10**10``, ``'a'*10**10``) are rejected by constant folding.
2. **Runtime guards** (AST transform). ``a ** b``, ``a * b`` and ``a << b`` are rewritten into checked helpers that
   refuse integers beyond ``MAX_INT_BITS`` and sequences beyond ``MAX_SEQ_LEN`` before computing them; ``pow``,
   ``math.factorial``/``comb``/``perm`` are wrapped the same way. ``import`` yields read-only proxies holding only
   the public ``math`` functions and ``Fraction`` (the real ``fractions`` module would expose ``fractions.sys``).
3. **Process isolation.** Programs run in a pool of persistent worker processes (fresh ``python -I -S``
   interpreters, so a torch-sized parent is never forked) with ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (armed per job,
   the kernel kills a worker stuck in C code), a per-job CPU timer that raises a clean timeout, ``RLIMIT_FSIZE=0``,
   no core dumps, stdout/stderr discarded, and a wall-clock deadline enforced by the parent, which kills and replaces
   a stuck or dead worker. The exec namespace's ``__builtins__`` is the allow-listed dict only.

``while`` loops are allowed: a loop that never ends is stopped by the per-job CPU limit and reported as
``"timeout"`` (bounding loops statically would reject many correct programs). ``for`` may iterate over any
expression: the language offers no unbounded iterator (no ``iter``/``itertools``/generator functions), so every
``for`` loop is finite and a huge ``range`` also ends in ``"timeout"``.

Public API: :class:`Sandbox` (``run``/``run_many``/``close``, context manager), :func:`execute`,
:func:`execute_many` and :func:`evaluate_expression` on a lazily created process-wide pool (closed at exit),
:func:`check_program` for pre-validation, and :class:`ExecResult`. Public calls never raise for a bad program.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import copy
import functools
import json
import marshal
import math
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from types import CodeType, SimpleNamespace
from typing import Any, Literal, Self

__all__ = [
    "ErrorKind",
    "ExecResult",
    "ForbiddenProgram",
    "ProgramSyntaxError",
    "Sandbox",
    "SandboxError",
    "check_program",
    "evaluate_expression",
    "execute",
    "execute_many",
]

MAX_SOURCE_CHARS = 20_000
MAX_INT_BITS = 100_000  # ~30k decimal digits: far beyond any word problem, cheap to compute
MAX_SEQ_LEN = 10_000_000  # longest list/str a `*` repeat may build
MAX_FACTORIAL_ARG = 10_000
MAX_RESULT_INT_BITS = 13_000  # ~3.9k digits: stays under Python's int->str limit, so the value stays JSON-encodable
MAX_RESULT_STR_CHARS = 10_000
MAX_MESSAGE_CHARS = 500
RECURSION_LIMIT = 2_000
WORKER_STARTUP_GRACE = 10.0  # seconds a fresh interpreter may take to boot before its first job's deadline starts

ErrorKind = Literal["syntax", "forbidden", "timeout", "memory", "runtime", "no_solution"]


# --------------------------------------------------------------------------------------------------------------------
# Results and errors
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecResult:
    """Outcome of one program: ``value`` is int/float/str/bool/None (Fractions become float), JSON-serialisable."""

    ok: bool
    value: int | float | str | bool | None = None
    error: ErrorKind | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "value": self.value, "error": self.error, "message": self.message}


class SandboxError(Exception):
    """Base of the sandbox's typed errors (raised only by :func:`check_program`)."""


class ForbiddenProgram(SandboxError, ValueError):
    """The program uses a construct outside the allow-list."""


class ProgramSyntaxError(SandboxError, SyntaxError):
    """The program does not parse."""


class ResourceLimit(MemoryError):
    """A checked operation would build an integer or sequence above the sandbox's size limits."""


class CpuTimeout(BaseException):
    """The per-job CPU timer fired. BaseException so no library code path can swallow it."""


# --------------------------------------------------------------------------------------------------------------------
# Guarded operations (used by the AST transform, the constant folder and the worker's builtins)
# --------------------------------------------------------------------------------------------------------------------

_SEQUENCE_TYPES = (str, list, tuple, bytes)


def _int_pow_bits(base: int, exp: int) -> float:
    """Estimated bit length of ``base ** exp`` for ints (exact enough to catch blow-ups)."""
    magnitude = abs(base)
    if magnitude <= 1:
        return 1.0
    bits = magnitude.bit_length()
    return exp * (math.log2(magnitude) if bits < 1000 else float(bits))


def checked_pow(base: Any, exp: Any, mod: Any = None) -> Any:
    """``pow`` that refuses results above MAX_INT_BITS before computing them."""
    if mod is not None:
        return pow(base, exp, mod)  # modular exponentiation stays as small as the modulus
    if isinstance(exp, int):
        size = abs(exp)
        if isinstance(base, int):
            estimate = _int_pow_bits(base, exp) if exp > 0 else 0.0  # negative powers of ints are floats
        elif isinstance(base, Fraction):
            estimate = max(_int_pow_bits(base.numerator, size), _int_pow_bits(base.denominator, size))
        else:
            estimate = 0.0  # floats overflow on their own (OverflowError), other types raise TypeError
        if estimate > MAX_INT_BITS:
            raise ResourceLimit(f"power result too large (~{estimate:.3g} bits > {MAX_INT_BITS})")
    return base**exp


def checked_mul(a: Any, b: Any) -> Any:
    """``a * b`` that refuses huge integers and huge sequence repeats (``[0]*10**10``, ``'a'*10**10``)."""
    ta, tb = type(a), type(b)
    if ta is float or tb is float:
        return a * b
    if isinstance(a, int) and isinstance(b, int):
        if a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
            raise ResourceLimit(f"product too large (> {MAX_INT_BITS} bits)")
        return a * b
    sequence, times = (b, a) if isinstance(a, int) else (a, b)
    if isinstance(times, int) and isinstance(sequence, _SEQUENCE_TYPES) and len(sequence) * times > MAX_SEQ_LEN:
        raise ResourceLimit(f"sequence repeat too large ({len(sequence)} x {times} > {MAX_SEQ_LEN})")
    return a * b


def checked_lshift(a: Any, b: Any) -> Any:
    """``a << b`` that refuses results above MAX_INT_BITS."""
    if isinstance(a, int) and isinstance(b, int) and a and b > 0 and a.bit_length() + b > MAX_INT_BITS:
        raise ResourceLimit(f"shift result too large (> {MAX_INT_BITS} bits)")
    return a << b


def _checked_factorial(n: Any) -> int:
    if isinstance(n, int) and n > MAX_FACTORIAL_ARG:
        raise ResourceLimit(f"factorial argument too large ({n} > {MAX_FACTORIAL_ARG})")
    return math.factorial(n)


def _checked_comb(n: Any, k: Any) -> int:
    if isinstance(n, int) and isinstance(k, int) and 0 <= k <= n and min(k, n - k) * math.log2(n) > MAX_INT_BITS:
        raise ResourceLimit(f"comb({n}, {k}) too large")
    return math.comb(n, k)


def _checked_perm(n: Any, k: Any = None) -> int:
    kk = n if k is None else k
    if isinstance(n, int) and isinstance(kk, int) and 0 <= kk <= n and kk * math.log2(max(n, 2)) > MAX_INT_BITS:
        raise ResourceLimit(f"perm({n}, {kk}) too large")
    return math.perm(n, k)


def _checked_prod(iterable: Any, *, start: Any = 1) -> Any:
    """``math.prod`` through checked_mul: a product of many big ints would otherwise grow unchecked in C."""
    total = start
    for item in iterable:
        total = checked_mul(total, item)
    return total


MATH_NAMES = frozenset(name for name in dir(math) if not name.startswith("_"))
FRACTIONS_NAMES = frozenset({"Fraction"})
ALLOWED_MODULES = {"math": MATH_NAMES, "fractions": FRACTIONS_NAMES}


def _math_proxy() -> SimpleNamespace:
    """The only ``math`` a program sees: public functions/constants, size-guarded where results can explode."""
    members = {name: getattr(math, name) for name in MATH_NAMES}
    members.update(factorial=_checked_factorial, comb=_checked_comb, perm=_checked_perm, prod=_checked_prod)
    return SimpleNamespace(**members)


# --------------------------------------------------------------------------------------------------------------------
# Static check: the allow-list
# --------------------------------------------------------------------------------------------------------------------

_ALLOWED_NODES: tuple[type[ast.AST], ...] = (
    # statements
    ast.Module, ast.Expression, ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.For, ast.While, ast.If,
    ast.Break, ast.Continue, ast.Pass, ast.FunctionDef, ast.Return, ast.Import, ast.ImportFrom, ast.alias, ast.Assert,
    # expressions
    ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Call, ast.keyword, ast.Constant, ast.Name,
    ast.Attribute, ast.Subscript, ast.Slice, ast.Starred, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.ListComp,
    ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension, ast.JoinedStr, ast.FormattedValue, ast.Lambda,
    ast.NamedExpr, ast.arguments, ast.arg,
    # contexts and operators (ast.Del and ast.MatMult are deliberately absent)
    ast.Load, ast.Store,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift, ast.RShift, ast.BitOr,
    ast.BitXor, ast.BitAnd, ast.UAdd, ast.USub, ast.Not, ast.Invert, ast.And, ast.Or,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Is, ast.IsNot, ast.In, ast.NotIn,
)  # fmt: skip

# Builtins that would hand out introspection, I/O or code execution. Referencing them at all is forbidden
# (they are also absent from the worker's builtins, so this is about a clear error, not the only barrier).
FORBIDDEN_NAMES = frozenset({
    "open", "eval", "exec", "compile", "getattr", "setattr", "delattr", "hasattr", "globals", "locals", "vars",
    "breakpoint", "input", "help", "dir", "type", "object", "super", "memoryview", "bytearray", "bytes",
    "classmethod", "staticmethod", "property", "id", "exit", "quit", "iter", "next", "aiter", "anext", "callable",
    "issubclass", "format", "hash", "copyright", "credits", "license", "os", "sys", "subprocess", "builtins",
})  # fmt: skip

SAFE_BUILTIN_NAMES = (
    "abs", "min", "max", "round", "sum", "len", "int", "float", "str", "bool", "range", "divmod", "sorted", "list",
    "tuple", "dict", "set", "frozenset", "enumerate", "zip", "any", "all", "reversed", "map", "filter", "isinstance",
    "chr", "ord", "bin", "hex", "oct",
)  # fmt: skip

# Attribute names any value may use: harmless container/string/number methods and properties.
SAFE_METHODS = frozenset({
    "append", "extend", "insert", "pop", "remove", "index", "count", "sort", "reverse", "copy", "clear",
    "keys", "values", "items", "get", "setdefault", "update", "add", "discard", "union", "intersection",
    "difference", "symmetric_difference", "issubset", "issuperset",
    "lower", "upper", "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "join", "replace", "startswith",
    "endswith", "isdigit", "isalpha", "isnumeric", "isdecimal", "title", "capitalize", "zfill", "ljust", "rjust",
    "center", "find", "rfind",
    "numerator", "denominator", "real", "imag", "is_integer", "limit_denominator", "conjugate", "bit_length",
    "as_integer_ratio",
})  # fmt: skip
ALLOWED_ATTRIBUTES = SAFE_METHODS | MATH_NAMES | FRACTIONS_NAMES

# Names the transform introduces; user code can never spell them because `_`-names are rejected first.
_POW, _MUL, _LSHIFT, _LAST = "__rl_pow__", "__rl_mul__", "__rl_lshift__", "__rl_last__"
_GUARDED_OPS = {ast.Pow: _POW, ast.Mult: _MUL, ast.LShift: _LSHIFT}


def _check_identifier(name: str | None, what: str) -> None:
    if name is None or name == "_":
        return
    if name.startswith("_"):
        raise ForbiddenProgram(f"{what} {name!r}: names starting with '_' (dunders/private names) are not allowed")
    if name in FORBIDDEN_NAMES:
        raise ForbiddenProgram(f"{what} {name!r} is not allowed in sandboxed programs")


_NOT_CONST = object()


def _fold(node: ast.AST, depth: int = 0) -> Any:
    """Constant-fold small numeric/string expressions with the guarded ops; _NOT_CONST when not a constant.

    Only used to reject obvious bombs statically, so it gives up (rather than recurses) on deep trees.
    """
    if depth > 20:
        return _NOT_CONST
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _fold(node.operand, depth + 1)
        if isinstance(value, (int, float)):
            return -value if isinstance(node.op, ast.USub) else value
        return _NOT_CONST
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pow" and not node.keywords:
        args = [_fold(arg, depth + 1) for arg in node.args]
        if len(args) == 2 and all(isinstance(a, (int, float)) for a in args):
            return checked_pow(*args)
        return _NOT_CONST
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.Mult, ast.LShift, ast.Add, ast.Sub)):
        left, right = _fold(node.left, depth + 1), _fold(node.right, depth + 1)
        if left is _NOT_CONST or right is _NOT_CONST:
            return _NOT_CONST
        try:
            if isinstance(node.op, ast.Pow):
                return checked_pow(left, right)
            if isinstance(node.op, ast.Mult):
                if isinstance(left, str) or isinstance(right, str):
                    text, times = (left, right) if isinstance(left, str) else (right, left)
                    if isinstance(times, int) and len(text) * times > MAX_SEQ_LEN:
                        raise ResourceLimit(f"string repeat too large ({len(text)} x {times} > {MAX_SEQ_LEN})")
                    return _NOT_CONST  # size-checked only: never build big strings in the parent
                return checked_mul(left, right)
            if isinstance(node.op, ast.LShift):
                return checked_lshift(left, right)
            return left + right if isinstance(node.op, ast.Add) else left - right
        except ResourceLimit:
            raise
        except Exception:  # noqa: BLE001 - TypeError, OverflowError, ...: not our business here, the runtime will report it
            return _NOT_CONST
    return _NOT_CONST


def _check_node(node: ast.AST) -> None:
    if not isinstance(node, _ALLOWED_NODES):
        raise ForbiddenProgram(f"{type(node).__name__} (line {getattr(node, 'lineno', '?')}) is not allowed")
    if isinstance(node, ast.Name):
        _check_identifier(node.id, "name")
    elif isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            raise ForbiddenProgram(f"attribute {node.attr!r}: names starting with '_' are not allowed")
        if node.attr not in ALLOWED_ATTRIBUTES:
            raise ForbiddenProgram(
                f"attribute {node.attr!r} is not allowed (only math/Fraction names and basic container/string methods)"
            )
        if not isinstance(node.ctx, ast.Load):
            raise ForbiddenProgram(f"assigning to attribute {node.attr!r} is not allowed")
    elif isinstance(node, ast.Constant):
        if type(node.value) not in (int, float, complex, str, bool, type(None)):
            raise ForbiddenProgram(f"constant of type {type(node.value).__name__} is not allowed")
    elif isinstance(node, ast.FunctionDef):
        _check_identifier(node.name, "function")
        if node.decorator_list:
            raise ForbiddenProgram(f"decorators are not allowed (function {node.name!r})")
    elif isinstance(node, ast.arg):
        _check_identifier(node.arg, "argument")
    elif isinstance(node, ast.keyword):
        _check_identifier(node.arg, "keyword argument")
    elif isinstance(node, ast.comprehension):
        if node.is_async:
            raise ForbiddenProgram("async comprehensions are not allowed")
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name not in ALLOWED_MODULES:
                raise ForbiddenProgram(f"import {alias.name!r} is not allowed (only math and fractions)")
            _check_identifier(alias.asname, "import alias")
    elif isinstance(node, ast.ImportFrom):
        if node.level or node.module not in ALLOWED_MODULES:
            raise ForbiddenProgram(f"from-import of {node.module!r} is not allowed (only math and fractions)")
        for alias in node.names:
            if alias.name not in ALLOWED_MODULES[node.module]:
                raise ForbiddenProgram(f"'from {node.module} import {alias.name}' is not allowed")
            _check_identifier(alias.asname, "import alias")
    if (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, (ast.Pow, ast.Mult, ast.LShift))
        or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pow")
    ):
        try:
            _fold(node)
        except ResourceLimit as exc:
            raise ForbiddenProgram(f"constant expression too large (line {node.lineno}): {exc}") from None


def _parse_and_check(code: str) -> ast.Module:
    if not isinstance(code, str):
        raise TypeError(f"program must be a str, got {type(code).__name__}")
    if len(code) > MAX_SOURCE_CHARS:
        raise ForbiddenProgram(f"program too long ({len(code)} chars > {MAX_SOURCE_CHARS}); shorten it")
    if "\x00" in code:
        raise ForbiddenProgram("program contains a NUL byte")
    try:
        tree = ast.parse(code, filename="<program>", mode="exec")
    except SyntaxError as exc:
        raise ProgramSyntaxError(exc.msg, (exc.filename, exc.lineno, exc.offset, exc.text)) from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise ForbiddenProgram(f"program is too deeply nested to check: {type(exc).__name__}") from None
    for node in ast.walk(tree):  # iterative, so deep trees cannot blow the parent's stack here
        _check_node(node)
    return tree


def check_program(code: str) -> None:
    """Raise :class:`ForbiddenProgram` or :class:`ProgramSyntaxError` (a ``SyntaxError``) if ``code`` may not run."""
    _parse_and_check(code)


# --------------------------------------------------------------------------------------------------------------------
# Transform + compile (cached)
# --------------------------------------------------------------------------------------------------------------------


class _GuardTransformer(ast.NodeTransformer):
    """Route `**`, `*`, `<<` (also augmented) through the checked helpers."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        helper = _GUARDED_OPS.get(type(node.op))
        if helper is None:
            return node
        return ast.copy_location(ast.Call(ast.Name(helper, ast.Load()), [node.left, node.right], []), node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        helper = _GUARDED_OPS.get(type(node.op))
        if helper is None:
            return node
        if not isinstance(node.target, (ast.Name, ast.Subscript)):
            raise ForbiddenProgram(f"augmented assignment target {type(node.target).__name__} is not allowed")
        load_target = copy.deepcopy(node.target)
        load_target.ctx = ast.Load()
        call = ast.Call(ast.Name(helper, ast.Load()), [load_target, node.value], [])
        return ast.copy_location(ast.Assign([node.target], call), node)


def _is_print_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"


@dataclass(frozen=True, slots=True)
class _Prepared:
    code: CodeType | None
    error: ErrorKind | None = None
    message: str = ""


@functools.lru_cache(maxsize=4096)  # sources are <= 20k chars, typically < 1k
def _prepare(code: str, capture_last: bool) -> _Prepared:
    """Check, transform and compile once per distinct source (self-consistency samples repeat a lot)."""
    try:
        tree = _parse_and_check(code)
        if (
            capture_last
            and tree.body
            and isinstance(tree.body[-1], ast.Expr)
            and not _is_print_call(tree.body[-1].value)
        ):
            last = tree.body[-1]
            tree.body[-1] = ast.copy_location(ast.Assign([ast.Name(_LAST, ast.Store())], last.value), last)
        tree = _GuardTransformer().visit(tree)
        ast.fix_missing_locations(tree)
        return _Prepared(compile(tree, "<program>", "exec", dont_inherit=True))
    except ProgramSyntaxError as exc:
        return _Prepared(None, "syntax", f"SyntaxError: {exc.msg} (line {exc.lineno})")
    except ForbiddenProgram as exc:
        return _Prepared(None, "forbidden", str(exc))
    except (RecursionError, MemoryError) as exc:
        return _Prepared(None, "forbidden", f"program is too deeply nested to compile: {type(exc).__name__}")
    except (SyntaxError, ValueError) as exc:  # compile-time errors the parser lets through (e.g. 'return' outside def)
        return _Prepared(None, "syntax", f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------------------------------------
# Worker process (runs in a fresh interpreter started by _Worker)
# --------------------------------------------------------------------------------------------------------------------


def _discard_print(*args: Any, **kwargs: Any) -> None:
    return None


def _restricted_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
    proxies = _WORKER_MODULES
    if level == 0 and name in proxies:
        return proxies[name]
    raise ImportError(f"import of {name!r} is not allowed")


_WORKER_MODULES: dict[str, SimpleNamespace] = {}


def _safe_builtins() -> dict[str, Any]:
    import builtins

    table: dict[str, Any] = {name: getattr(builtins, name) for name in SAFE_BUILTIN_NAMES}
    math_proxy = _math_proxy()
    fractions_proxy = SimpleNamespace(Fraction=Fraction)
    _WORKER_MODULES.update(math=math_proxy, fractions=fractions_proxy)
    table.update({
        "pow": checked_pow, "print": _discard_print, "math": math_proxy, "fractions": fractions_proxy,
        "Fraction": Fraction, "__import__": _restricted_import,
        _POW: checked_pow, _MUL: checked_mul, _LSHIFT: checked_lshift,
    })  # fmt: skip
    return table


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def _describe(exc: BaseException) -> str:
    try:
        detail = str(exc)
    except Exception:  # noqa: BLE001 - e.g. an exception holding an int too long to print
        detail = "<unprintable>"
    return _clip(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)


def _to_payload(value: Any) -> dict[str, Any]:
    """Convert a program's return value into a JSON-safe result payload."""
    if value is None or isinstance(value, bool):
        return {"ok": True, "value": value}
    if isinstance(value, Fraction):
        value = float(value)
    if isinstance(value, int):
        if value.bit_length() > MAX_RESULT_INT_BITS:
            return {"ok": False, "error": "runtime", "message": f"integer result too large ({value.bit_length()} bits)"}
        return {"ok": True, "value": int(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            return {"ok": False, "error": "runtime", "message": f"result is not a finite number ({value})"}
        return {"ok": True, "value": float(value)}
    if isinstance(value, (list, tuple, dict, set, frozenset, range)):
        # Answers are scalars (a number, a string, a bool): `[1, 2, 3]` is not an answer to a math question.
        return {"ok": False, "error": "runtime",
                "message": f"result is a {type(value).__name__}, not a single answer; return one number"}
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_RESULT_STR_CHARS:
        return {"ok": False, "error": "runtime", "message": f"result too long ({len(text)} chars)"}
    return {"ok": True, "value": str(text)}


class _Job:
    """Per-worker execution state: the CPU timer flag and limits."""

    def __init__(self, cpu_seconds: float) -> None:
        import resource

        self.cpu_seconds = cpu_seconds
        self.armed = False
        self.resource = resource
        self.builtins = _safe_builtins()
        signal.signal(signal.SIGPROF, self._on_cpu_timer)

    def _on_cpu_timer(self, signum: int, frame: Any) -> None:
        if self.armed:
            self.armed = False
            raise CpuTimeout()

    def _arm(self) -> None:
        # Per-job CPU budget: the timer raises a clean CpuTimeout between bytecodes; RLIMIT_CPU (a little later)
        # makes the kernel kill the worker if it is stuck inside one long C call, and the parent replaces it.
        res = self.resource
        usage = res.getrusage(res.RUSAGE_SELF)
        _, hard = res.getrlimit(res.RLIMIT_CPU)
        soft = int(usage.ru_utime + usage.ru_stime + self.cpu_seconds) + 2
        if hard != res.RLIM_INFINITY:
            soft = min(soft, hard)
        res.setrlimit(res.RLIMIT_CPU, (soft, hard))
        self.armed = True
        signal.setitimer(signal.ITIMER_PROF, self.cpu_seconds)

    def _disarm(self) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_PROF, 0)

    def run(self, code: CodeType, entry: str | None) -> dict[str, Any]:
        namespace: dict[str, Any] = {"__builtins__": self.builtins, "__name__": "__sandbox__"}
        try:
            try:
                self._arm()
                exec(code, namespace)  # noqa: S102 - the point of the module: checked, transformed, rlimited
                if entry is None:
                    payload = self._module_value(namespace)
                else:
                    function = namespace.get(entry)
                    if not callable(function):
                        payload = {
                            "ok": False,
                            "error": "no_solution",
                            "message": f"program defines no function {entry!r}; define `def {entry}(): ...`",
                        }
                    else:
                        payload = _to_payload(function())
            finally:
                self._disarm()
        except CpuTimeout:
            payload = {"ok": False, "error": "timeout", "message": f"CPU time limit ({self.cpu_seconds}s) exceeded"}
        except MemoryError as exc:
            namespace.clear()
            import gc

            gc.collect()
            payload = {"ok": False, "error": "memory", "message": _describe(exc)}
        except RecursionError as exc:
            payload = {"ok": False, "error": "runtime", "message": _describe(exc)}
        except BaseException as exc:  # noqa: BLE001 - anything the program raised is a runtime error
            payload = {"ok": False, "error": "runtime", "message": _describe(exc)}
        namespace.clear()
        return payload

    @staticmethod
    def _module_value(namespace: dict[str, Any]) -> dict[str, Any]:
        for name in (_LAST, "answer", "result"):
            if name in namespace:
                return _to_payload(namespace[name])
        function = namespace.get("solution")
        if callable(function):
            return _to_payload(function())
        return {
            "ok": False,
            "error": "no_solution",
            "message": "no final expression, no `answer`/`result` variable and no solution() function",
        }


def _worker_main(config_json: str) -> None:
    """Entry point of a worker interpreter: read job batches on fd 0, answer one JSON line per job on fd 1."""
    import resource

    config = json.loads(config_json)
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # program output (and any stray interpreter noise) goes nowhere
        os.dup2(devnull, fd)
    limit = int(config["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    sys.setrecursionlimit(RECURSION_LIMIT)
    sys.set_int_max_str_digits(4300)
    job = _Job(float(config["cpu_seconds"]))
    replies.write(b'{"ready": true}\n')
    replies.flush()
    while True:
        header = requests.read(4)
        if len(header) < 4:
            return  # parent closed the pipe: shut down
        batch = marshal.loads(requests.read(int.from_bytes(header, "little")))
        for job_id, code, entry in batch:
            payload = job.run(code, entry)
            payload["i"] = job_id
            replies.write(json.dumps(payload).encode() + b"\n")
            replies.flush()


_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_reasonlite_sandbox_worker', sys.argv[1])\n"
    "module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._worker_main(sys.argv[2])\n"
)


# --------------------------------------------------------------------------------------------------------------------
# Parent side: worker handles and the pool
# --------------------------------------------------------------------------------------------------------------------


class _Worker:
    """One worker interpreter plus the jobs it is currently running (in order)."""

    def __init__(self, config: dict[str, Any]) -> None:
        # A fresh interpreter (-I: ignore env/user site, -S: no site-packages) instead of fork: the parent may hold
        # GBs of torch mappings that RLIMIT_AS would count, and forking threads is unsafe.
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # only boot errors land here: the worker points fd 2 at /dev/null once up
            start_new_session=True,  # Ctrl-C in a terminal reaches the parent only; it shuts workers down
            close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.ready = False
        self.outstanding: deque[int] = deque()
        self.deadline = math.inf

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, batch: list[tuple[int, CodeType, str | None]]) -> None:
        payload = marshal.dumps(batch)
        self.proc.stdin.write(len(payload).to_bytes(4, "little") + payload)
        self.proc.stdin.flush()

    def boot_error(self) -> str:
        """What a worker that died before becoming ready printed (call only once it has exited)."""
        try:
            return self.proc.stderr.read()[-MAX_MESSAGE_CHARS:].decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def kill(self) -> int:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        return self.proc.wait()


def _death_result(returncode: int) -> ExecResult:
    if returncode == -signal.SIGXCPU:
        return ExecResult(False, None, "timeout", "worker exceeded RLIMIT_CPU and was killed")
    return ExecResult(False, None, "runtime", f"sandbox worker died (exit status {returncode})")


class Sandbox:
    """A pool of ``workers`` sandboxed interpreters. Thread-safe; use as a context manager or call :meth:`close`.

    ``cpu_seconds`` is the CPU budget per program, ``memory_mb`` the address-space limit of each worker, and
    ``wall_timeout`` the wall-clock seconds the parent waits for one program before killing its worker.
    """

    def __init__(self, workers: int = 2, cpu_seconds: float = 2.0, memory_mb: int = 512, wall_timeout: float = 3.0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if cpu_seconds <= 0 or wall_timeout <= 0:
            raise ValueError(f"cpu_seconds and wall_timeout must be > 0, got {cpu_seconds} and {wall_timeout}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (a Python interpreter needs ~30 MB), got {memory_mb}")
        self.workers = workers
        self.cpu_seconds = float(cpu_seconds)
        self.memory_mb = int(memory_mb)
        self.wall_timeout = float(wall_timeout)
        self._config = {"cpu_seconds": self.cpu_seconds, "memory_mb": self.memory_mb}
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        for _ in range(workers):
            self._idle.put(self._spawn())

    # -- public API ----------------------------------------------------------------------------------------------

    def run(self, code: str, entry: str | None = "solution") -> ExecResult:
        """Run one program; ``entry=None`` returns the last expression (or ``answer``/``result``) instead."""
        return self.run_many([code], entry=entry)[0]

    def run_many(self, codes: list[str], entry: str | None = "solution") -> list[ExecResult]:
        """Run programs in parallel over the workers; results come back in input order."""
        if entry is not None and (not entry.isidentifier() or entry.startswith("_")):
            raise ValueError(f"entry must be a public identifier or None, got {entry!r}")
        if self._closed:
            raise RuntimeError("Sandbox is closed; create a new one")
        results: list[ExecResult | None] = [None] * len(codes)
        compiled: dict[int, CodeType] = {}
        for index, code in enumerate(codes):
            prepared = (
                _prepare(code, entry is None)
                if isinstance(code, str)
                else _Prepared(None, "forbidden", f"program must be a str, got {type(code).__name__}")
            )
            if prepared.code is None:
                results[index] = ExecResult(False, None, prepared.error, prepared.message)
            else:
                compiled[index] = prepared.code
        if compiled:
            self._dispatch(compiled, entry, results)
        return results  # type: ignore[return-value]

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring, and for tests that kill one)."""
        with self._lock:
            return sorted(worker.pid for worker in self._all)

    def close(self) -> None:
        """Stop all workers. Idempotent."""
        with self._lock:
            self._closed = True
            workers, self._all = list(self._all), set()
        if os.getpid() != self._pid:
            return  # a forked child must not kill its parent's workers
        for worker in workers:
            worker.kill()

    def __del__(self) -> None:
        # Safety net for pools dropped without close(); workers also exit on their own when this process ends
        # (their stdin reaches EOF).
        # May run during interpreter shutdown (globals gone) or on a half-built instance: never raise here.
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        worker = _Worker(self._config)
        with self._lock:
            self._all.add(worker)
        return worker

    def _retire(self, worker: _Worker) -> int:
        with self._lock:
            self._all.discard(worker)
        return worker.kill()

    def _checkout(self, wanted: int) -> list[_Worker]:
        """Take at least one idle worker (waiting if other threads hold them all), more if idle right now."""
        while True:
            if self._closed:
                raise RuntimeError("Sandbox is closed; create a new one")
            try:
                taken = [self._idle.get(timeout=0.5)]
                break
            except queue.Empty:
                continue
        while len(taken) < wanted:
            try:
                taken.append(self._idle.get_nowait())
            except queue.Empty:
                break
        return taken

    def _checkin(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if self._closed:
                self._retire(worker)
            else:
                self._idle.put(worker)

    def _dispatch(self, compiled: dict[int, CodeType], entry: str | None, results: list[ExecResult | None]) -> None:
        pending: deque[int] = deque(compiled)
        chunk = max(1, min(64, len(pending) // (4 * self.workers)))
        workers = self._checkout(min(self.workers, len(pending)))
        retried: set[int] = set()
        failed_starts, boot_error = 0, ""
        selector = selectors.DefaultSelector()

        def replace(old: _Worker) -> _Worker:
            selector.unregister(old.fd)
            self._retire(old)
            new = self._spawn()
            selector.register(new.fd, selectors.EVENT_READ, new)
            workers[workers.index(old)] = new
            return new

        def requeue(worker: _Worker) -> None:
            pending.extendleft(reversed(worker.outstanding))
            worker.outstanding.clear()

        try:
            for worker in workers:
                selector.register(worker.fd, selectors.EVENT_READ, worker)
            while pending or any(w.outstanding for w in workers):
                if failed_starts > 3:
                    message = f"sandbox workers fail to start: {boot_error or 'no output'}"
                    for worker in workers:
                        requeue(worker)
                    for index in pending:
                        results[index] = ExecResult(False, None, "runtime", message)
                    return
                for worker in list(workers):
                    if worker.outstanding or not pending:
                        continue
                    if not worker.alive():  # died while idle (e.g. killed externally): replace before use
                        worker = replace(worker)
                    batch = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    worker.outstanding.extend(batch)
                    worker.deadline = (
                        time.monotonic() + self.wall_timeout + (0.0 if worker.ready else WORKER_STARTUP_GRACE)
                    )
                    try:
                        worker.send([(index, compiled[index], entry) for index in batch])
                    except (BrokenPipeError, OSError):
                        requeue(worker)
                        replace(worker)
                        failed_starts += 1
                timeout = (
                    min(w.deadline for w in workers if w.outstanding) - time.monotonic()
                    if any(w.outstanding for w in workers)
                    else 0.0
                )
                for key, _ in selector.select(max(0.0, timeout)):
                    worker = key.data
                    data = os.read(worker.fd, 1 << 16)
                    if not data:  # EOF: the worker died, charge the job it was running
                        returncode = worker.proc.wait()
                        if worker.outstanding:
                            index = worker.outstanding.popleft()
                            if returncode != -signal.SIGXCPU and index not in retried:
                                retried.add(index)  # maybe killed from outside while innocent: one more try
                                pending.appendleft(index)
                            else:
                                results[index] = _death_result(returncode)
                        if not worker.ready:
                            failed_starts += 1
                            boot_error = worker.boot_error()
                        requeue(worker)
                        replace(worker)
                        continue
                    self._read_replies(worker, data, results)
                now = time.monotonic()
                for worker in list(workers):
                    if worker.outstanding and now >= worker.deadline:
                        index = worker.outstanding.popleft()
                        results[index] = ExecResult(
                            False, None, "timeout", f"wall-clock limit ({self.wall_timeout}s) exceeded"
                        )
                        requeue(worker)
                        replace(worker)
        finally:
            selector.close()
            # A worker left mid-batch (only after an internal error) has unread replies: never reuse it.
            for position, worker in enumerate(workers):
                if worker.outstanding:
                    self._retire(worker)
                    workers[position] = self._spawn()
            self._checkin(workers)

    def _read_replies(self, worker: _Worker, data: bytes, results: list[ExecResult | None]) -> None:
        worker.buffer += data
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            reply = json.loads(line)
            if "ready" in reply:
                worker.ready = True
                if worker.outstanding:  # the startup grace is over: the first job now gets the normal deadline
                    worker.deadline = time.monotonic() + self.wall_timeout
                continue
            index = worker.outstanding.popleft()
            if reply.get("i") != index:
                raise RuntimeError(f"sandbox protocol out of sync: expected job {index}, got {reply.get('i')}")
            results[index] = ExecResult(
                bool(reply["ok"]), reply.get("value"), reply.get("error"), reply.get("message", "")
            )
            worker.deadline = time.monotonic() + self.wall_timeout


# --------------------------------------------------------------------------------------------------------------------
# Process-wide default pool
# --------------------------------------------------------------------------------------------------------------------

_default_sandbox: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """The lazily created process-wide pool (``Sandbox()`` defaults), recreated in a forked child, closed at exit."""
    global _default_sandbox
    with _default_lock:
        if _default_sandbox is None or _default_sandbox._closed or _default_sandbox._pid != os.getpid():
            _default_sandbox = Sandbox()
        return _default_sandbox


@atexit.register
def _close_default_sandbox() -> None:
    if _default_sandbox is not None:
        _default_sandbox.close()


def execute(code: str, entry: str | None = "solution") -> ExecResult:
    """Run one program on the default pool (see :meth:`Sandbox.run`)."""
    return default_sandbox().run(code, entry=entry)


def execute_many(codes: list[str], entry: str | None = "solution") -> list[ExecResult]:
    """Run programs in parallel on the default pool (see :meth:`Sandbox.run_many`)."""
    return default_sandbox().run_many(codes, entry=entry)


@functools.lru_cache(maxsize=4096)
def _expression_error(expr: str) -> ExecResult | None:
    try:
        ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        return ExecResult(False, None, "syntax", f"not a single expression: SyntaxError: {exc.msg}")
    except (RecursionError, MemoryError, ValueError) as exc:
        return ExecResult(False, None, "forbidden", f"expression cannot be checked: {type(exc).__name__}")
    return None


def evaluate_expression(expr: str, sandbox: Sandbox | None = None) -> ExecResult:
    """Evaluate one calculator expression such as ``"48/2"`` or ``"3*(4+5)"`` (GSM8K ``<<...>>`` annotations)."""
    if not isinstance(expr, str):
        return ExecResult(False, None, "forbidden", f"expression must be a str, got {type(expr).__name__}")
    expr = expr.strip()
    if len(expr) > MAX_SOURCE_CHARS:
        return ExecResult(False, None, "forbidden", f"expression too long ({len(expr)} chars > {MAX_SOURCE_CHARS})")
    error = _expression_error(expr)
    if error is not None:
        return error
    return (sandbox or default_sandbox()).run(expr, entry=None)
