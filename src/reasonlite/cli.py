"""`reasonlite` command line: one config, one command per stage, `run` for all of them, `tune` to search knobs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from reasonlite.config import ConfigError, ReasonLiteConfig, dump_config, load_config, parse_override

app = typer.Typer(help="ReasonLite: distil reasoning into small language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect the config surface.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console()

SetOption = typer.Option(None, "--set", "-s", help="override a knob: section.field=value (repeatable)")


def _load(config: Path | None, overrides: list[str] | None) -> ReasonLiteConfig:
    try:
        return load_config(config, dict(parse_override(o) for o in overrides or []))
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


def _run_dir(cfg: ReasonLiteConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.name


@config_app.command("show")
def config_show(config: Path | None = typer.Argument(None), set: list[str] | None = SetOption) -> None:
    """Print the resolved config (YAML) with every default filled in."""
    console.print(dump_config(_load(config, set)), highlight=False, markup=False)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of the config (every field with its description)."""
    import json

    print(json.dumps(ReasonLiteConfig.model_json_schema(), indent=2))


@app.command()
def traces(config: Path | None = typer.Argument(None), out: Path | None = typer.Option(None, help="trace-set folder"),
           set: list[str] | None = SetOption) -> None:
    """Ask the teacher, verify, vote and write a trace-set folder."""
    from reasonlite.teachers import TeacherError
    from reasonlite.traces import build_trace_set

    cfg = _load(config, set)
    try:
        build_trace_set(cfg, out or _run_dir(cfg) / "traces")
    except TeacherError as e:  # unreachable teacher, wrong key, unknown model: the message names the knob
        console.print(f"[red]teacher error:[/red] {e}\n(completions received so far are kept in the cache)",
                      highlight=False)
        raise typer.Exit(1) from None


@app.command()
def train(config: Path | None = typer.Argument(None), traces_dir: Path | None = typer.Option(None, "--traces"),
          out: Path | None = typer.Option(None, help="training output folder"),
          resume: bool = typer.Option(False, help="continue from the last checkpoint"),
          adapter_only: bool = typer.Option(False, help="export the LoRA adapter instead of a merged model"),
          set: list[str] | None = SetOption) -> None:
    """Train the student on a trace set (SFT, then the optional contrastive stage) and export it."""
    from reasonlite.train import train_student

    cfg = _load(config, set)
    train_student(cfg, traces_dir or _run_dir(cfg) / "traces", out or _run_dir(cfg) / "train", resume=resume,
                  adapter_only=adapter_only)


@app.command("eval")
def eval_cmd(target: str = typer.Argument(..., help="a config YAML (evaluates its run's model) or a model alias/folder"),
             data: str | None = typer.Option(None, help="retail_math, gsm8k, or a .jsonl/.csv file"),
             fmt: str | None = typer.Option(None, "--format",
                                               help="student format (default: the model's reasonlite.json, else cot)"),
             budgets: str | None = typer.Option(None, help="comma-separated inference caps, e.g. 32,64,128"),
             n: int = typer.Option(1, help="self-consistency samples"),
             limit: int | None = typer.Option(None, help="evaluate at most N questions"),
             out: Path | None = typer.Option(None, help="report folder"),
             calculator: bool = typer.Option(False, "--calculator",
                                             help="cot: compute each 'EXPRESSION =' and force the exact result"),
             set: list[str] | None = SetOption) -> None:
    """Evaluate a student: accuracy, tokens, latency, exec errors; JSON + Markdown report + PNG."""
    from reasonlite.evaluate import eval_command

    overrides = [*(set or []), *(["eval.calculator=true"] if calculator else [])]
    try:
        eval_command(target=target, data=data, fmt=fmt, budgets=budgets, n=n, limit=limit, out=out,
                     overrides=overrides)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@app.command()
def compare(runs: list[Path] = typer.Argument(..., help="eval result folders or result.json files")) -> None:
    """Print eval results side by side."""
    from reasonlite.evaluate import compare_runs

    try:
        compare_runs(runs)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@app.command()
def run(config: Path | None = typer.Argument(None), force: list[str] | None = typer.Option(None, help="rerun a stage: traces|train|eval"),
        set: list[str] | None = SetOption) -> None:
    """traces -> train -> eval -> export in one run folder; unchanged stages are reused."""
    from reasonlite.pipeline import run_pipeline

    cfg = _load(config, set)
    run_pipeline(cfg, force=tuple(force or ()))


@app.command()
def tune(config: Path | None = typer.Argument(None), space: Path = typer.Option(..., help="search space YAML"),
         trials: int = typer.Option(10, help="trials for this worker"),
         storage: str | None = typer.Option(None, help="Optuna storage URL (default SQLite in the run folder)"),
         pick: str | None = typer.Option(None, help="accuracy|tokens|knee"),
         set: list[str] | None = SetOption) -> None:
    """Optuna search over dotted config paths; writes the Pareto front and best.yaml."""
    from reasonlite.tune import tune_command

    cfg = _load(config, set)
    tune_command(cfg, space=space, trials=trials, storage=storage, pick=pick)


@app.command()
def demo(set: list[str] | None = SetOption) -> None:
    """The quickstart: retail-math, dataset teacher, SmolLM2 student with PAL and the budget controller."""
    from reasonlite.pipeline import run_demo

    run_demo(overrides=set)


if __name__ == "__main__":
    app()
