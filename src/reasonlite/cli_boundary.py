"""The one error boundary of the `reasonlite` and `slm-fusion` command lines.

Every expected error ends a command with ONE line on stderr (what, where, the fix) and a documented exit code:

    2  usage or config: a bad option, a bad config field or value (`reasonlite config show` lists the fields)
    3  data or model not found: a missing file, folder, model or weights
    4  runtime failure: the teacher, training, serving or anything else that broke while running

Tracebacks only with `--debug` (anywhere on the command line) or REASONLITE_DEBUG=1. The boundary lives in the
click group's `main`, so the installed scripts and typer's CliRunner in tests go through the same code.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer
import typer.core
from typer._click import exceptions as cx  # typer vendors click: its errors are not the `click` package's

USAGE, NOT_FOUND, RUNTIME = 2, 3, 4


def exit_code_for(exc: BaseException) -> int:
    """2 usage/config, 3 data/model not found, 4 runtime; an exception may say its own with `exit_code`."""
    if isinstance(exc, cx.UsageError):
        return USAGE
    if isinstance(exc, cx.FileError):
        return NOT_FOUND
    if isinstance(exc, cx.ClickException):
        return USAGE
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and code >= 2:
        return code
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return NOT_FOUND
    if isinstance(exc, ValueError):
        return USAGE
    return RUNTIME


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line config errors are joined with '; ')."""
    if isinstance(exc, cx.ClickException):
        text = exc.format_message().replace("Value error, ", "")
        ctx = getattr(exc, "ctx", None)
        if isinstance(exc, cx.UsageError) and ctx is not None:
            text += f" (see `{ctx.command_path} --help`)"
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError) and exc.args:
            text = str(exc.args[0])
        if exit_code_for(exc) == RUNTIME and not _is_expected(exc):
            text = f"unexpected {type(exc).__name__}: {text} (rerun with --debug for the traceback)"
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    joined = parts[0] if parts else text
    for part in parts[1:]:
        joined += (" " if joined.endswith(":") else "; ") + part
    return joined


_EXPECTED_NAMES = {"TeacherError", "ContextError", "TrainError", "FusionError", "MergeError", "RoutingConfigError",
                   "PortInUse"}


def _is_expected(exc: BaseException) -> bool:
    return any(c.__name__ in _EXPECTED_NAMES for c in type(exc).__mro__) or isinstance(exc, OSError)


def debug_requested(args: list[str]) -> bool:
    return "--debug" in args or os.environ.get("REASONLITE_DEBUG", "") not in ("", "0")


# Deprecation notices the libraries print about their own internals (PEFT reads transformers' old
# `is_gradient_checkpointing`; Optuna marks stable options experimental): nothing a user can act on, so a normal run
# does not show them. `--debug` shows everything.
_LIBRARY_NOISE = (
    (FutureWarning, r".*is deprecated and will be removed in v\d"),
    (UserWarning, r".*(?:generation flags are not valid|was truncated|Setting `pad_token_id`).*"),
)


def quiet_library_warnings() -> None:
    # transformers' tqdm bars ("Loading weights", "Writing model shards") under our own rich progress; read by
    # huggingface_hub when transformers is first imported, which the commands do lazily, after this.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category, message in _LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    try:
        import optuna

        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    except ImportError:  # slm-fusion alone does not need optuna
        pass


class OneLineErrorsGroup(typer.core.TyperGroup):
    """A typer group whose `main` turns every error into one line on stderr and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = debug_requested(args)
        args = [a for a in args if a != "--debug"]
        if not debug:
            quiet_library_warnings()
        try:
            # Non-standalone, typer returns a command's `raise typer.Exit(code)` as the return value.
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
            if standalone_mode:
                sys.exit(rv if isinstance(rv, int) else 0)
            return rv
        except typer.Exit as e:
            if standalone_mode:
                sys.exit(e.exit_code)
            return e.exit_code
        except typer.Abort:
            print("aborted", file=sys.stderr)
            code = 130
        except Exception as e:  # the boundary: everything ends as one line and an exit code
            if debug:
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            code = exit_code_for(e)
        if standalone_mode:
            sys.exit(code)
        return code


def version_callback(prog: str, dist: str = "reasonlite"):
    """An eager `--version` option callback printing `<prog> <version of the installed distribution>`."""

    def show(value: bool) -> None:
        if value:
            from importlib.metadata import PackageNotFoundError, version

            try:
                v = version(dist)
            except PackageNotFoundError:
                v = "unknown"
            print(f"{prog} {v}")
            raise typer.Exit(0)

    return show
