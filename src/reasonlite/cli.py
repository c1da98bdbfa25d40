"""`reasonlite` command line: one config, one command per stage, `run` for all of them, `tune` to search knobs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from reasonlite.cli_boundary import OneLineErrorsGroup, version_callback
from reasonlite.config import ReasonLiteConfig, dump_config, load_config, parse_override

# Errors: one line on stderr and exit 2 usage/config, 3 data/model not found, 4 runtime (reasonlite.cli_boundary).
app = typer.Typer(help="ReasonLite: distil reasoning into small language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=OneLineErrorsGroup)
config_app = typer.Typer(help="Inspect the config surface.", no_args_is_help=True)
app.add_typer(config_app, name="config")
verifier_app = typer.Typer(help="Train a verifier that picks the best of k sampled programs.", no_args_is_help=True)
app.add_typer(verifier_app, name="verifier")
data_app = typer.Typer(help="Write the built-in generators' data to files.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()

SetOption = typer.Option(None, "--set", "-s", help="override a knob: section.field=value (repeatable)")
NprocOption = typer.Option(1, "--nproc", min=1, help="data-parallel training processes (torchrun: gloo on CPU, NCCL "
                                                     "on GPU); train.batch_size is per process")


class Stage(str, Enum):
    traces = "traces"
    train = "train"
    eval = "eval"


class Select(str, Enum):
    greedy = "greedy"
    vote = "vote"
    verifier = "verifier"


class Pick(str, Enum):
    accuracy = "accuracy"
    tokens = "tokens"
    knee = "knee"


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=version_callback("reasonlite"), is_eager=True,
                                       help="print the version and exit"),
          debug: bool = typer.Option(False, "--debug", help="show tracebacks instead of one-line errors")) -> None:
    """ReasonLite: distil reasoning into small language models."""


def _load(config: Path | None, overrides: list[str] | None) -> ReasonLiteConfig:
    return load_config(config, dict(parse_override(o) for o in overrides or []))  # ConfigError: exit 2, one line


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
    from reasonlite.data.loaders import DataError
    from reasonlite.pipeline import run_stage
    from reasonlite.teachers import TeacherError
    from reasonlite.traces import build_trace_set

    def build(folder: Path) -> None:
        if not build_trace_set(cfg, folder).traces:  # written for inspection, but nothing to train on is an error
            raise DataError(f"{folder}: the trace set is empty (no trace passed verification/selection); check the "
                            "teacher (teacher.*) or loosen traces.self_consistency.min_agreement")

    cfg = _load(config, set)
    try:
        if out is not None:
            build(out)
        else:  # the stage folder of this config's hash, linked from the run folder (never written through a link)
            run_stage(cfg, "traces", build)
    except TeacherError as e:  # unreachable teacher, wrong key, unknown model: the message names the knob
        raise TeacherError(f"teacher error: {e} (completions received so far are kept in the cache)") from e


@app.command()
def train(config: Path | None = typer.Argument(None), traces_dir: Path | None = typer.Option(None, "--traces"),
          out: Path | None = typer.Option(None, help="training output folder"),
          resume: bool = typer.Option(False, help="continue from the newest complete checkpoint"),
          fresh: bool = typer.Option(False, help="delete earlier checkpoints and start over"),
          adapter_only: bool = typer.Option(False, help="export the LoRA adapter instead of a merged model"),
          nproc: int = NprocOption, set: list[str] | None = SetOption) -> None:
    """Train the student on a trace set (SFT, then the optional contrastive stage) and export it."""
    from reasonlite.pipeline import run_stage, traces_for
    from reasonlite.train.distributed import launch

    cfg = _load(config, set)
    if resume and fresh:
        raise typer.BadParameter("--resume and --fresh exclude each other; pick one", param_hint="--fresh")
    source = traces_dir or traces_for(cfg)
    if out is not None:
        launch(cfg, source, out, nproc, resume=resume, fresh=fresh, adapter_only=adapter_only)
    else:  # the stage folder of this config's hash: a changed knob never writes into another config's cached stage
        run_stage(cfg, "train", lambda folder: launch(cfg, source, folder, nproc, resume=resume, fresh=fresh,
                                                       adapter_only=adapter_only), force=fresh)


@app.command("eval")
def eval_cmd(target: str = typer.Argument(..., help="a config YAML (evaluates its run's model) or a model alias/folder"),
             data: str | None = typer.Option(None, help="retail_math, retail_docs, gsm8k, or a .jsonl/.csv file"),
             fmt: str | None = typer.Option(None, "--format",
                                               help="student format (default: the model's reasonlite.json, else cot)"),
             budgets: str | None = typer.Option(None, help="comma-separated inference caps, e.g. 32,64,128"),
             n: int = typer.Option(1, min=1, max=64, help="self-consistency samples"),
             limit: int | None = typer.Option(None, min=1, help="evaluate at most N questions"),
             out: Path | None = typer.Option(None, help="report folder"),
             calculator: bool = typer.Option(False, "--calculator",
                                             help="cot: compute each 'EXPRESSION =' and force the exact result"),
             select: Select | None = typer.Option(None, help="answer among the n samples by: greedy, vote, verifier "
                                                            "(default eval.select)"),
             verifier: Path | None = typer.Option(None, help="verifier folder for --select verifier "
                                                             "(default eval.verifier_path)"),
             set: list[str] | None = SetOption) -> None:
    """Evaluate a student: accuracy, tokens, latency, exec errors; JSON + Markdown report + PNG."""
    from reasonlite.evaluate import eval_command

    overrides = [*(set or []), *(["eval.calculator=true"] if calculator else []),
                 *([f"eval.select={select.value}"] if select else []),
                 *([f"eval.verifier_path={verifier}"] if verifier else [])]
    eval_command(target=target, data=data, fmt=fmt, budgets=budgets, n=n, limit=limit, out=out, overrides=overrides)


@verifier_app.command("train")
def verifier_train(config: Path | None = typer.Argument(None),
                   student: Path | None = typer.Option(None, help="student folder (default: the run's train/model)"),
                   out: Path | None = typer.Option(None, help="verifier folder (default: the run's verifier/)"),
                   set: list[str] | None = SetOption) -> None:
    """Sample k programs per training question, label them by execution, train the scorer (resumable)."""
    from reasonlite.verifier import train_verifier_command

    cfg = _load(config, set)
    student_ref = student or _run_dir(cfg) / "train" / "model"
    if student is None and not Path(student_ref).exists():
        raise FileNotFoundError(f"{student_ref}: no trained student; run `reasonlite train {config or 'CONFIG'}` "
                                "first or pass --student DIR")
    out = out or _run_dir(cfg) / "verifier"
    train_verifier_command(cfg, student_ref, out)
    console.print(f"use it: reasonlite eval {config or 'CONFIG'} --select verifier --verifier {out} --n "
                  f"{cfg.verifier.k}")


@data_app.command("retail-docs")
def data_retail_docs(out_dir: Path = typer.Argument(..., help="folder for the documents (one .md file each)"),
                     seed: int | None = typer.Option(None, help="generator seed (default: the config's data.seed)"),
                     config: Path | None = typer.Option(None, help="config whose data.seed is used"),
                     set: list[str] | None = SetOption) -> None:
    """Write the retail_docs documents (catalog pages, promotions, stock reports, policies) for a vector store."""
    from reasonlite.data.retail_docs import write_retail_docs

    paths = write_retail_docs(out_dir, seed=_load(config, set).data.seed if seed is None else seed)
    console.print(f"{len(paths)} documents in {out_dir}")
    console.print(f"index them: slm-fusion store ingest {out_dir} --store retail-docs --config GATEWAY.yaml",
                  soft_wrap=True)


@app.command()
def compare(runs: list[Path] = typer.Argument(..., help="eval result folders or result.json files")) -> None:
    """Print eval results side by side."""
    from reasonlite.evaluate import compare_runs

    compare_runs(runs)


@app.command()
def run(config: Path | None = typer.Argument(None),
        force: list[Stage] | None = typer.Option(None, help="rerun a stage (and the ones after it)"),
        nproc: int = NprocOption, set: list[str] | None = SetOption) -> None:
    """traces -> train -> eval -> export in one run folder; unchanged stages are reused."""
    from reasonlite.pipeline import print_outputs, print_summary, run_pipeline

    cfg = _load(config, set)
    result = run_pipeline(cfg, force=tuple(f.value for f in force or ()), nproc=nproc)
    print_summary(result)
    print_outputs(result)


class Quant(str, Enum):
    f16 = "f16"
    q8_0 = "q8_0"
    q4_k_m = "q4_k_m"


@app.command()
def export(run: Path = typer.Argument(..., help="run folder (runs/NAME) or an exported student folder"),
           gguf: bool = typer.Option(False, "--gguf", help="write a GGUF file (LoRA merged) and an Ollama Modelfile"),
           quant: Quant = typer.Option(Quant.q8_0, help="GGUF weight type: f16, q8_0 or q4_k_m"),
           out: Path | None = typer.Option(None, help="output folder (default RUN/export)")) -> None:
    """Export the run's student where models run: GGUF for llama.cpp / llama-cpp-python / Ollama."""
    if not gguf:  # the HF folder is what training already exported
        raise typer.BadParameter("choose a format: --gguf (the HF folder is already RUN/train/model)",
                                 param_hint="--gguf")
    from reasonlite.gguf_export import export_run

    with console.status(f"writing the {quant.value} GGUF"):
        path, serve = export_run(run, quant=quant.value, out=out)
    console.print(f"GGUF:      {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    console.print(f"Ollama:    ollama create {path.stem} -f {path.parent / 'Modelfile'}")
    if serve is not None:
        console.print(f"Serve it:  slm-fusion serve {serve} --port 8000   (the GGUF is its model '<name>-gguf')")


@app.command()
def tune(config: Path | None = typer.Argument(None), space: Path = typer.Option(..., help="search space YAML"),
         trials: int = typer.Option(10, min=0, help="trials for this worker (0: only rewrite the reports)"),
         storage: str | None = typer.Option(None, help="Optuna storage URL: sqlite:///path.db or "
                                                       "postgresql://user@host/db (default SQLite in the run folder)"),
         pick: Pick | None = typer.Option(None, help="which Pareto point becomes best.yaml (default tune.pick)"),
         set: list[str] | None = SetOption) -> None:
    """Optuna search over dotted config paths; writes the Pareto front and best.yaml."""
    from reasonlite.tune import tune_command

    cfg = _load(config, set)
    tune_command(cfg, space=space, trials=trials, storage=storage, pick=pick.value if pick else None)


@app.command()
def dashboard(storage: str | None = typer.Argument(None, help="storage URL, .db file or config YAML (default: the "
                                                             "default config's tune storage)"),
              host: str = typer.Option("127.0.0.1", help="address to listen on"),
              port: int = typer.Option(8080, min=0, max=65535, help="port (0: a free one)"),
              set: list[str] | None = SetOption) -> None:
    """Open optuna-dashboard on a tuning study's storage (Ctrl-C stops it)."""
    import signal

    from reasonlite.dashboard import make_dashboard_server, resolve_storage

    url = resolve_storage(storage, dict(parse_override(o) for o in set or []))
    server = make_dashboard_server(url, host=host, port=port)
    # Ctrl-C stops it even when the parent handed this process SIGINT ignored or blocked (a launcher, a test runner,
    # a shell's background job): both are inherited across exec, and Python then never raises KeyboardInterrupt.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # plain print, flushed: the server is already bound, so whoever reads this line can connect at once
    print(f"optuna-dashboard for {url} at http://{host}:{server.server_port}/dashboard", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command()
def demo(set: list[str] | None = SetOption) -> None:
    """The quickstart: retail-math, dataset teacher, SmolLM2 student with PAL and the budget controller."""
    from reasonlite.pipeline import run_demo

    run_demo(overrides=set)


if __name__ == "__main__":
    app()
