"""`slm-fusion merge` and `slm-fusion merge-lora`: typer command functions (registered by `slm_fusion.cli`).

    slm-fusion merge examples/merge.yaml runs/merged/
    slm-fusion merge-lora runs/a/adapter runs/b/adapter --out runs/merged/ --weights 0.5,0.5 --method ties
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
# The merge modules import torch: they are imported inside the commands so `slm-fusion --help` stays fast.


def _print_report(report) -> None:
    table = Table(title=f"merged with {report.method} -> {report.out_dir}", show_header=False)
    table.add_row("inputs", "\n".join(report.inputs))
    table.add_row("tensors", str(report.n_tensors))
    table.add_row("weights written", f"{report.total_bytes / 1e6:.1f} MB in {len(report.shards)} shard(s)")
    table.add_row("peak tensor memory", f"{report.peak_tensor_bytes / 1e6:.1f} MB (driver accounting)")
    table.add_row("time", f"{report.seconds:.1f} s")
    console.print(table)


def merge(
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="merge YAML (see examples/merge.yaml)")],
    out_dir: Annotated[Path, typer.Argument(help="output folder for the merged HF model")],
    dtype: Annotated[str | None, typer.Option(help="override the config's dtype: float16 | bfloat16 | float32")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Merge models tensor by tensor as the YAML config says (linear, task_arithmetic, ties, dare_*, slerp)."""
    from slm_fusion.merging.config import load_merge_config
    from slm_fusion.merging.driver import run_merge

    cfg = load_merge_config(config)
    if dtype:
        cfg = cfg.model_validate({**cfg.model_dump(), "dtype": dtype})
    report = run_merge(cfg, out_dir, show_progress=progress)
    _print_report(report)


def merge_lora(
    adapters: Annotated[list[Path], typer.Argument(help="one or more PEFT LoRA adapter folders of the same base")],
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    base: Annotated[str | None, typer.Option(help="base model (folder or alias); default: the adapters' base")] = None,
    weights: Annotated[str | None, typer.Option(help="comma-separated weight per adapter (default 1 each)")] = None,
    method: Annotated[str, typer.Option(help="linear | ties | concat")] = "linear",
    density: Annotated[float, typer.Option(help="ties: fraction of each delta kept")] = 1.0,
    as_adapter: Annotated[bool, typer.Option("--as-adapter", help="write a new adapter (linear/concat)")] = False,
    dtype: Annotated[str, typer.Option(help="dtype of a merged model")] = "float32",
) -> None:
    """Fold LoRA adapters into their base (streaming), or combine several into one model or adapter."""
    from slm_fusion.merging.driver import MergeError, MergeReport
    from slm_fusion.merging.lora import combine_adapters, merge_adapter

    for adapter in adapters:  # a full model here would be "merged" into a plain copy, reported as success
        if not (Path(adapter) / "adapter_config.json").exists():
            raise MergeError(f"{adapter} is not a LoRA adapter (no adapter_config.json); merge-lora folds "
                             "adapters into their base, use `slm-fusion merge` to combine full models")
    parsed = [float(w) for w in weights.split(",")] if weights else None
    if len(adapters) == 1 and not as_adapter and method == "linear" and parsed is None:
        result = merge_adapter(adapters[0], out, base=base, dtype=dtype)
    else:
        result = combine_adapters(
            adapters,
            out,
            weights=parsed,
            method=method,
            density=density,
            base=base,
            output="adapter" if as_adapter else "model",
            dtype=dtype,
        )
    if isinstance(result, MergeReport):
        _print_report(result)
    else:
        console.print(f"adapter written to {result}")


def merge_eval(
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the merge YAML, with models[i].eval")],
    merged: Annotated[Path, typer.Argument(help="the merged model folder `slm-fusion merge` wrote")],
    out: Annotated[Path | None, typer.Option(help="report folder (default MERGED/merge_eval)")] = None,
    limit: Annotated[int | None, typer.Option(help="questions per task split (overrides eval.limit)")] = None,
    base: Annotated[bool, typer.Option("--base", help="also score the base model on every task")] = False,
    batch_size: Annotated[int, typer.Option(help="questions generated together")] = 16,
    compare_routing: Annotated[bool, typer.Option(
        "--compare-routing", help="also: the specialists behind a router (adapters / full models) vs the merge")] = False,
) -> None:
    """Score the merged model and each specialist on each specialist's task set: one table."""
    from slm_fusion.merging.config import load_merge_config
    from slm_fusion.merging.evaluate import merge_eval as run

    run(load_merge_config(config), merged, out_dir=out, limit=limit, with_base=base, batch_size=batch_size,
        compare_routing=compare_routing)


def merge_tune(
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the merge YAML, every model with eval")],
    space: Annotated[Path, typer.Option("--space", help="search space YAML (methods, weight, density, lambda, ...)")],
    out: Annotated[Path, typer.Option(help="study folder: study.db, pareto.md, summary.json, best_merge.yaml")] = Path(
        "runs/merge-tune"),
    trials: Annotated[int, typer.Option(help="trials to run now (capped by the space's `trials` in all)")] = 10,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: SQLite in --out)")] = None,
    batch_size: Annotated[int, typer.Option(help="questions generated together")] = 16,
) -> None:
    """Search merge method and parameters against each task's dev set; Pareto front + best merge YAML (resumable)."""
    from slm_fusion.merging.config import load_merge_config
    from slm_fusion.merging.tune import load_space
    from slm_fusion.merging.tune import merge_tune as run

    if trials < 0:
        raise typer.BadParameter("must be >= 0 (0 only rewrites the reports)", param_hint="--trials")
    cfg = load_merge_config(config)
    run(cfg, load_space(space, cfg), out, trials, storage=storage, batch_size=batch_size)


def register(app: typer.Typer) -> None:
    """Add `merge`, `merge-lora`, `merge-eval` and `merge-tune` to the slm-fusion app."""
    app.command("merge")(merge)
    app.command("merge-lora")(merge_lora)
    app.command("merge-eval")(merge_eval)
    app.command("merge-tune")(merge_tune)
