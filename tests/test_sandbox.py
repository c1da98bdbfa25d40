"""Sandboxed executor: hostile programs are refused or stopped with typed errors, benign ones give exact values."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from reasonlite import sandbox as sandbox_module
from reasonlite.sandbox import (
    ExecResult,
    ForbiddenProgram,
    ProgramSyntaxError,
    Sandbox,
    check_program,
    evaluate_expression,
    execute,
    execute_many,
)

CANARY = Path(f"/tmp/reasonlite_sandbox_canary_{os.getpid()}")
BENIGN = "def solution():\n    return 6 * 7\n"


@pytest.fixture(scope="module")
def sb():
    # Small CPU budget so timeouts are quick; memory well above an interpreter's ~30 MB.
    with Sandbox(workers=2, cpu_seconds=0.5, memory_mb=256, wall_timeout=3.0) as box:
        yield box


def _fn(body: str) -> str:
    """Wrap statements into a PAL-style solution()."""
    return "def solution():\n" + "\n".join("    " + line for line in body.splitlines()) + "\n"


FORBIDDEN = {"forbidden"}
BOMB = {"forbidden", "memory"}  # caught statically (constant folding) or by the runtime guard

HOSTILE: list[tuple[str, str, set[str]]] = [
    ("dunder_import", _fn(f"return __import__('os').system('touch {CANARY}')"), FORBIDDEN),
    ("import_os", f"import os\ndef solution():\n    os.system('touch {CANARY}')\n    return 1", FORBIDDEN),
    ("import_subprocess", "import subprocess\ndef solution():\n    return 1", FORBIDDEN),
    (
        "from_os_import_system",
        f"from os import system\ndef solution():\n    return system('touch {CANARY}')",
        FORBIDDEN,
    ),
    ("import_math_submodule_alias", "import math, os\ndef solution():\n    return 1", FORBIDDEN),
    ("from_fractions_sys", "from fractions import sys\ndef solution():\n    return 1", FORBIDDEN),
    ("fractions_module_sys", "import fractions\ndef solution():\n    return fractions.sys.modules", FORBIDDEN),
    ("mro_subclasses", _fn("return ().__class__.__mro__[1].__subclasses__()"), FORBIDDEN),
    ("getattr_class", _fn("return getattr(1, '__class__')"), FORBIDDEN),
    ("getattr_escaped_name", _fn("return getattr(1, '\\x5f\\x5fclass\\x5f\\x5f')"), FORBIDDEN),
    ("open_passwd", _fn("return open('/etc/passwd').read()"), FORBIDDEN),
    ("open_write_canary", _fn(f"open('{CANARY}', 'w').write('x')\nreturn 1"), FORBIDDEN),
    ("eval", _fn("return eval('1+1')"), FORBIDDEN),
    ("exec", _fn("exec('x = 1')\nreturn 1"), FORBIDDEN),
    ("compile", _fn("return compile('1', 'f', 'eval')"), FORBIDDEN),
    ("globals", _fn("return globals()"), FORBIDDEN),
    ("locals_builtins", _fn("return locals()['x']"), FORBIDDEN),
    ("vars_dir", _fn("return dir(vars())"), FORBIDDEN),
    ("breakpoint", _fn("breakpoint()\nreturn 1"), FORBIDDEN),
    ("input", _fn("return input()"), FORBIDDEN),
    ("type_call", _fn("return type('X', (), {})"), FORBIDDEN),
    ("object_name", _fn("return object"), FORBIDDEN),
    ("lambda_globals", _fn("return (lambda: 0).__globals__"), FORBIDDEN),
    ("lambda_code", _fn("f = lambda g: g.__code__\nreturn f(solution)"), FORBIDDEN),
    ("comprehension_subclasses", _fn("return [x for x in ().__class__.__bases__[0].__subclasses__()]"), FORBIDDEN),
    ("str_format_attribute", _fn("return '{0.__class__}'.format(1)"), FORBIDDEN),
    ("format_builtin", _fn("return format(1, 'd')"), FORBIDDEN),
    ("fstring_dunder", _fn("return f'{(1).__class__}'"), FORBIDDEN),
    ("generator_frame", _fn("g = (x for x in [1])\nreturn g.gi_frame.f_back.f_globals"), FORBIDDEN),
    ("math_loader", "import math\ndef solution():\n    return math.__loader__.load_module('os')", FORBIDDEN),
    ("math_dict", "import math as m\ndef solution():\n    return m.__dict__", FORBIDDEN),
    (
        "fraction_init_globals",
        "from fractions import Fraction\n" + _fn("return Fraction.__init__.__globals__['sys']"),
        FORBIDDEN,
    ),
    ("print_self_builtins", _fn("return print.__self__"), FORBIDDEN),
    ("type_mro_method", _fn("return int.mro()"), FORBIDDEN),
    ("unicode_eval", _fn("return \uff45\uff56\uff41\uff4c('1+1')"), FORBIDDEN),  # fullwidth 'eval' (NFKC)
    ("unicode_dunder_import", _fn("return _\uff3fimport\uff3f\uff3f('os')"), FORBIDDEN),  # NFKC -> __import__
    ("private_name", _fn("_secret = 1\nreturn _secret"), FORBIDDEN),
    ("class_def", "class A:\n    pass\ndef solution():\n    return 1", FORBIDDEN),
    ("try_except", _fn("try:\n    x = 1\nexcept Exception:\n    x = 2\nreturn x"), FORBIDDEN),
    ("with_open", _fn(f"with open('{CANARY}', 'w') as f:\n    f.write('x')\nreturn 1"), FORBIDDEN),
    ("global_stmt", "x = 1\ndef solution():\n    global x\n    x = 2\n    return x", FORBIDDEN),
    ("del_stmt", _fn("x = 1\ndel x\nreturn 1"), FORBIDDEN),
    ("yield_generator", "def gen():\n    yield 1\ndef solution():\n    return 1", FORBIDDEN),
    ("async_def", "async def solution():\n    return 1", FORBIDDEN),
    ("decorator", "def deco(f):\n    return f\n@deco\ndef solution():\n    return 1", FORBIDDEN),
    ("attribute_store", "import math\ndef solution():\n    math.pi = 3\n    return 1", FORBIDDEN),
    ("raise_stmt", _fn("raise SystemExit(0)"), FORBIDDEN),
    ("too_long_source", "# " + "x" * 20_001 + "\ndef solution():\n    return 1", FORBIDDEN),
    ("deeply_nested", "def solution():\n    return " + "1+" * 6_000 + "1\n", FORBIDDEN),
    ("while_true", _fn("while True:\n    pass"), {"timeout"}),
    ("huge_range_loop", _fn("for i in range(10**12):\n    pass\nreturn 1"), {"timeout"}),
    ("list_repeat_bomb", _fn("return [0] * 10**10"), {"memory"}),
    ("str_repeat_bomb", _fn("return 'a' * 10**10"), BOMB),
    ("str_repeat_bomb_runtime", _fn("n = 10\nreturn 'a' * n**10"), {"memory"}),
    # which of the two limits trips first depends on the machine's speed; both stop the program
    ("list_growth_loop", _fn("x = [0] * 1000\nwhile True:\n    x = x + x"), {"memory", "timeout"}),
    ("nested_list_growth", _fn("x = [[0] * 1000]\nwhile True:\n    x.append(x[-1] + x[-1])"), {"memory"}),
    ("list_range_materialise", _fn("return len(list(range(10**9)))"), {"memory"}),
    ("int_squaring_loop", _fn("x = 3\nfor _ in range(40):\n    x = x * x\nreturn x"), {"memory"}),
    ("deep_recursion", "def f(n):\n    return f(n + 1)\ndef solution():\n    return f(0)", {"runtime"}),
    ("exponent_tower", _fn("return 10**10**10"), BOMB),
    ("exponent_tower_runtime", _fn("x = 10\nreturn x**x**x"), {"memory"}),
    ("exponent_2_2_40", _fn("return 2**(2**40)"), BOMB),
    ("pow_builtin_bomb", _fn("return pow(10, 10**9)"), BOMB),
    ("pow_builtin_runtime", _fn("n = 10**9\nreturn pow(10, n)"), {"memory"}),
    ("augassign_pow_bomb", _fn("x = 10\nx **= 10**9\nreturn x"), {"memory"}),
    ("shift_bomb", _fn("n = 10**10\nreturn 1 << n"), {"memory"}),
    ("factorial_bomb", "import math\ndef solution():\n    return math.factorial(10**8)", {"memory"}),
    (
        "from_math_factorial_bomb",
        "from math import factorial\ndef solution():\n    return factorial(10**8)",
        {"memory"},
    ),
    ("comb_bomb", "import math\ndef solution():\n    return math.comb(10**9, 10**5)", {"memory"}),
    ("prod_bomb", "import math\ndef solution():\n    return math.prod([10**1000] * 1000)", {"memory"}),
    ("ljust_bomb", _fn("return 'a'.ljust(10**10)"), {"memory"}),
]


def test_hostile_corpus_is_large_enough():
    assert len(HOSTILE) >= 30


@pytest.mark.parametrize(("name", "code", "expected"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_program_gets_typed_error_and_pool_survives(sb, name, code, expected):
    result = sb.run(code)
    assert isinstance(result, ExecResult)
    assert not result.ok, f"{name} unexpectedly succeeded with {result.value!r}"
    assert result.error in expected, f"{name}: {result.error} ({result.message})"
    assert result.message
    assert result.value is None
    assert not CANARY.exists(), f"{name} managed to create a file on the host"
    follow_up = sb.run(BENIGN)
    assert follow_up == ExecResult(True, 42, None, "")


def test_static_checker_rejects_hostile_code_without_running_it():
    for name, code, expected in HOSTILE:
        if expected == FORBIDDEN:
            with pytest.raises(ForbiddenProgram):
                check_program(code)
    with pytest.raises(SyntaxError) as info:
        check_program("def solution(:\n    return 1")
    assert isinstance(info.value, ProgramSyntaxError)
    check_program("import math\ndef solution():\n    return math.sqrt(2)")  # benign: no exception


def test_error_messages_name_the_bad_construct():
    with pytest.raises(ForbiddenProgram, match="'eval'"):
        check_program("eval('1')")
    with pytest.raises(ForbiddenProgram, match="import 'os'"):
        check_program("import os")
    with pytest.raises(ForbiddenProgram, match="ClassDef"):
        check_program("class A: pass")


BENIGN_CASES: list[tuple[str, str, object]] = [
    ("division", _fn("return 48 / 2"), 24.0),
    ("int_arithmetic", _fn("return (17 // 5) + 17 % 5 - -3 + 2**10"), 3 + 2 + 3 + 1024),
    (
        "retail",
        _fn("price = 12.5\nqty = 4\nsubtotal = price * qty\ndiscount = subtotal * 0.2\nreturn subtotal - discount"),
        40.0,
    ),
    ("range_loop", _fn("total = 0\nfor i in range(1, 11):\n    total += i\nreturn total"), 55),
    ("underscore_loop_var", _fn("x = 0\nfor _ in range(5):\n    x += 2\nreturn x"), 10),
    ("bounded_while", _fn("x = 1\nwhile x < 100:\n    x *= 2\nreturn x"), 128),
    (
        "comprehensions",
        _fn(
            "a = sum([x * x for x in range(5)])\nb = len({x % 3 for x in range(10)})\n"
            "c = {k: v for k, v in zip('ab', [1, 2])}\nreturn a + b + c['b'] + sum(x for x in [1, 2])"
        ),
        30 + 3 + 2 + 3,
    ),
    ("fractions", "from fractions import Fraction\ndef solution():\n    return Fraction(1, 3) + Fraction(1, 6)", 0.5),
    ("fractions_module", "import fractions\ndef solution():\n    return fractions.Fraction(3, 4) * 2", 1.5),
    (
        "math_funcs",
        "import math\ndef solution():\n    return math.floor(7 / 2) + math.ceil(7 / 2) + math.sqrt(9)",
        10.0,
    ),
    ("from_math", "from math import gcd, pi\ndef solution():\n    return gcd(12, 18) + round(pi, 2)", 6 + 3.14),
    (
        "nested_functions",
        (
            "def solution():\n    def add(a, b):\n        return a + b\n"
            "    def twice(x):\n        return add(x, x)\n    return twice(21)"
        ),
        42,
    ),
    (
        "if_else",
        _fn("x = 7\nif x > 5:\n    y = 'big'\nelif x > 2:\n    y = 'mid'\nelse:\n    y = 'small'\nreturn y"),
        "big",
    ),
    ("ifexp_bool", _fn("return True if 3 > 2 and not False else False"), True),
    ("none_result", _fn("x = 1"), None),
    (
        "methods",
        _fn(
            "items = []\nfor i in range(3):\n    items.append(i)\nd = {'a': 1}\n"
            "return len(items) + sum(v for k, v in d.items()) + len('a,b'.split(','))"
        ),
        3 + 1 + 2,
    ),
    ("sorted_lambda", _fn("return sorted([3, 1, 2], key=lambda v: -v)[0]"), 3),
    ("divmod_pow_mod", _fn("q, r = divmod(17, 5)\nreturn q * 10 + r + pow(2, 10**18, 7)"), 32 + pow(2, 10**18, 7)),
    ("big_but_allowed_int", _fn("return 2**100"), 2**100),
    ("print_is_discarded", _fn("for i in range(100):\n    print('noise', i)\nreturn 5"), 5),
    ("annassign_walrus", _fn("x: int = 3\nif (y := x * 2) > 5:\n    return y\nreturn 0"), 6),
    (
        "recursion_ok",
        "def fact(n):\n    return 1 if n <= 1 else n * fact(n - 1)\ndef solution():\n    return fact(10)",
        3_628_800,
    ),
    ("math_prod", "import math\ndef solution():\n    return math.prod([2, 3, 4])", 24),
    ("math_without_import", _fn("return math.ceil(2.1)"), 3),
]


@pytest.mark.parametrize(("name", "code", "expected"), BENIGN_CASES, ids=[c[0] for c in BENIGN_CASES])
def test_benign_programs_return_exact_values(sb, name, code, expected):
    result = sb.run(code)
    assert result.ok, f"{name}: {result.error} {result.message}"
    assert result.error is None
    if isinstance(expected, float):
        assert result.value == pytest.approx(expected)
    else:
        assert result.value == expected
        assert type(result.value) is type(expected)
    json.dumps(result.to_dict())  # always JSON-serialisable


def test_runtime_errors_are_typed(sb):
    assert sb.run(_fn("return 1 / 0")).error == "runtime"
    assert "ZeroDivisionError" in sb.run(_fn("return 1 / 0")).message
    assert sb.run(_fn("return undefined_name")).error == "runtime"
    assert sb.run(_fn("return float('inf')")).error == "runtime"  # not JSON-representable
    assert sb.run(_fn("return 10**5000")).error == "runtime"  # too large to report as a JSON number
    assert sb.run("x = 5").error == "no_solution"
    assert sb.run("def answer():\n    return 1").error == "no_solution"
    assert sb.run("def solution(:\n  return 1").error == "syntax"
    assert sb.run("return 5").error == "syntax"  # compiles only inside a function
    assert sb.run("def main():\n    return 9", entry="main") == ExecResult(True, 9, None, "")


def test_module_level_entry_none(sb):
    assert sb.run("48/2", entry=None).value == 24.0
    assert sb.run("x = 3\ny = 4\nx * y", entry=None).value == 12
    assert sb.run("answer = 5\nprint(answer)", entry=None).value == 5
    assert sb.run("result = 7", entry=None).value == 7
    assert sb.run("def solution():\n    return 8", entry=None).value == 8
    assert sb.run("x = 1", entry=None).error == "no_solution"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("48/2", 24.0),
        ("3*(4+5)", 27),
        ("2**10", 1024),
        ("10 % 3", 1),
        ("7 // 2", 3),
        (" 0.5 * 30 ", 15.0),
        ("round(10/3, 2)", 3.33),
    ],
)
def test_evaluate_expression(sb, expr, expected):
    result = evaluate_expression(expr, sandbox=sb)
    assert result.ok and result.value == expected


def test_evaluate_expression_errors(sb):
    assert evaluate_expression("x = 1", sandbox=sb).error == "syntax"
    assert evaluate_expression("1 +", sandbox=sb).error == "syntax"
    assert evaluate_expression("10**10**10", sandbox=sb).error == "forbidden"
    assert evaluate_expression("__import__('os')", sandbox=sb).error == "forbidden"
    assert evaluate_expression("1/0", sandbox=sb).error == "runtime"


def test_run_many_keeps_order_and_mixes_errors(sb):
    codes = [_fn(f"return {i} * 3") for i in range(200)]
    codes[17] = _fn("return 1 / 0")
    codes[50] = "import os"
    codes[120] = _fn("while True:\n    pass")
    results = sb.run_many(codes)
    assert len(results) == 200
    for i, result in enumerate(results):
        if i == 17:
            assert result.error == "runtime"
        elif i == 50:
            assert result.error == "forbidden"
        elif i == 120:
            assert result.error == "timeout"
        else:
            assert result == ExecResult(True, i * 3, None, "")


def test_stdout_of_programs_is_discarded(sb, capfd):
    result = sb.run(_fn("for i in range(2000):\n    print('x' * 100)\nreturn 1"))
    assert result.ok and result.value == 1
    captured = capfd.readouterr()
    assert "xxxx" not in captured.out and "xxxx" not in captured.err


def test_worker_killed_while_idle_is_replaced():
    with Sandbox(workers=2, cpu_seconds=1.0, wall_timeout=5.0) as box:
        assert box.run(BENIGN).ok
        before = box.worker_pids()
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        assert box.run_many([BENIGN] * 4) == [ExecResult(True, 42, None, "")] * 4
        after = box.worker_pids()
        assert len(after) == 2 and not set(after) & set(before)


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of `pid` in clock ticks (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_worker_killed_mid_batch_jobs_are_retried():
    busy = _fn("t = 0\nfor i in range(300000):\n    t += i\nreturn t")
    with Sandbox(workers=2, cpu_seconds=2.0, wall_timeout=10.0) as box:
        assert box.run(BENIGN).ok
        victim = box.worker_pids()[0]
        killed_busy: list[bool] = []
        batch_done = threading.Event()

        def kill_once_busy() -> None:  # SIGKILL once the victim has spent 50 ms of CPU on the batch: mid-job
            start = _cpu_ticks(victim)  # (no event says "busy": its CPU clock in /proc is the signal)
            while _cpu_ticks(victim) < start + 5:
                if batch_done.wait(0.002):
                    return  # the batch ended first: the assertion below fails at once, not after a timeout
            os.kill(victim, signal.SIGKILL)
            killed_busy.append(True)

        killer = threading.Thread(target=kill_once_busy, daemon=True)
        killer.start()
        results = box.run_many([busy] * 40)
        batch_done.set()
        killer.join()
        assert killed_busy == [True]
        assert all(r == ExecResult(True, sum(range(300000)), None, "") for r in results)
        assert victim not in box.worker_pids()


def test_wall_timeout_kills_and_replaces_worker():
    with Sandbox(workers=1, cpu_seconds=30.0, wall_timeout=0.5) as box:
        assert box.run(BENIGN).ok
        before = box.worker_pids()
        started = time.monotonic()
        result = box.run(_fn("while True:\n    pass"))
        assert time.monotonic() - started < 5.0
        assert result.error == "timeout" and "wall-clock" in result.message
        assert box.run(BENIGN).ok
        assert box.worker_pids() != before


def test_cpu_rlimit_kills_worker_stuck_in_c_code():
    # sum(range(...)) runs in C, where the Python-level CPU timer cannot interrupt it: RLIMIT_CPU must.
    with Sandbox(workers=1, cpu_seconds=0.2, wall_timeout=30.0) as box:
        result = box.run(_fn("return sum(range(10**11))"))
        assert result.error == "timeout"
        assert box.run(BENIGN).ok


def test_concurrent_callers_share_the_pool(sb):
    errors: list[str] = []

    def worker(offset: int) -> None:
        for i in range(30):
            result = sb.run(_fn(f"return {offset} + {i}"))
            if result != ExecResult(True, offset + i, None, ""):
                errors.append(repr(result))

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors


def test_default_pool_is_lazy_shared_and_recreated_after_close():
    assert execute(BENIGN) == ExecResult(True, 42, None, "")
    pool = sandbox_module.default_sandbox()
    assert sandbox_module.default_sandbox() is pool
    assert execute_many([BENIGN, "import os"])[1].error == "forbidden"
    assert evaluate_expression("6*7").value == 42
    pool.close()
    assert execute(BENIGN).ok
    assert sandbox_module.default_sandbox() is not pool


def test_closed_sandbox_refuses_work_and_constructor_validates():
    box = Sandbox(workers=1)
    pids = box.worker_pids()
    box.close()
    box.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        box.run(BENIGN)
    for pid in pids:  # close() reaps its workers: none is left, not even as a zombie
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ValueError, match="workers"):
        Sandbox(workers=0)
    with pytest.raises(ValueError, match="memory_mb"):
        Sandbox(memory_mb=8)
    with pytest.raises(ValueError, match="entry"):
        Sandbox.run_many(box, [BENIGN], entry="__init__")


def test_exec_result_is_frozen():
    result = ExecResult(True, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.ok = False  # type: ignore[misc]


@pytest.mark.parametrize("code", [_fn("return [1, 2, 3]"), _fn("return (1, 2)"), _fn("return {'a': 1}"),
                                  _fn("return {1, 2}"), "answer = [1, 2]"])
def test_container_result_is_not_an_answer(sb, code):
    result = sb.run(code, entry="solution" if "def solution" in code else None)
    assert not result.ok and result.error == "runtime"
    assert "not a single answer" in result.message
