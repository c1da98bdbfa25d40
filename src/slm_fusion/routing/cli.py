"""Routing commands of `slm-fusion`: `router train`, `route-eval`, and the routing part of `check`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
router_app = typer.Typer(help="Train routers.", no_args_is_help=True)


@router_app.command("train")
def train(
    data: Annotated[Path, typer.Option(help="Labelled JSONL: one {\"prompt\", \"model\"} object per line.")],
    out: Annotated[Path, typer.Option(help="Where to write the router file (joblib).")] = Path("router.pkl"),
    embedding: Annotated[str, typer.Option(help="Embedding model name.")] = "all-minilm-l6-v2",
    calibrate: Annotated[bool | None, typer.Option(
        help="Calibrate probabilities (default: when every class has >= 15 rows).")] = None,
    single_fit: Annotated[bool, typer.Option(
        help="One LR + out-of-fold calibration instead of a 3-fold ensemble: ~3x cheaper decisions.")] = False,
) -> None:
    """Train a `classifier` router (embeddings + logistic regression) and save it with its embedding model id."""
    from slm_fusion.routing.base import load_labelled
    from slm_fusion.routing.classifier import train_classifier

    rows = load_labelled(data)
    with console.status(f"embedding {len(rows)} prompts and fitting"):
        bundle = train_classifier(rows, out, embedding=embedding, calibrate=calibrate,
                                  single_fit=single_fit)
    table = Table(title=f"router classifier → {out}")
    table.add_column("model")
    table.add_column("rows", justify="right")
    for label in bundle["labels"]:
        table.add_row(label, str(bundle["class_counts"][label]))
    console.print(table)
    console.print(f"embedding {bundle['embedding_model_id']} ({bundle['dim']}-d); calibrated={bundle['calibrated']}; "
                  f"train accuracy {bundle['train_accuracy']:.3f}")


def route_eval(
    config: Annotated[Path, typer.Argument(help="Gateway YAML config with `virtual_models`.")],
    data: Annotated[Path, typer.Option(help="Labelled JSONL (prompt, model, optional answer).")],
    out: Annotated[Path, typer.Option(help="Output folder for route_eval.json/.md and the PNG curve.")] = Path(
        "route-eval"),
    only: Annotated[list[str] | None, typer.Option(help="Evaluate only these virtual models.")] = None,
    max_answerable: Annotated[int, typer.Option(
        help="Rows with a gold answer used for each cascade (each costs real generations).")] = 20,
) -> None:
    """Routing accuracy, confusion matrix, decision latency; quality vs cost curve for cascades."""
    from slm_fusion.routing.evaluate import cascade_table, run_route_eval

    result = run_route_eval(config, data, out, only=only, max_answerable=max_answerable)
    table = Table(title=f"routing on {result['n_rows']} prompts")
    for col in ("virtual model", "router", "accuracy", "p50 ms", "p99 ms"):
        table.add_column(col)
    for r in result["routers"]:
        table.add_row(r["virtual_model"], f"{r['kind']}:{r['router']}", f"{r['accuracy']:.3f}",
                      f"{r['latency_ms']['p50']:.2f}", f"{r['latency_ms']['p99']:.2f}")
    console.print(table)
    for c in result["cascades"]:
        console.print(cascade_table(c["curve"], f"cascade {c['name']}: {c['small']} → {c['big']}"))
    console.print(f"wrote {', '.join(result['files'].values())}")


def check_routing(cfg) -> None:
    """Build every router (exemplars, classifier files, models named) so errors show now; embeddings stay unloaded."""
    from slm_fusion.routing import build_routers

    settings = cfg.routing
    if not (cfg.routers or cfg.virtual_models or settings.fallbacks):
        return
    virtual = build_routers(cfg, load_models=False)
    table = Table(title="virtual models")
    for col in ("name", "router", "kind", "can route to"):
        table.add_column(col)
    for name, vm in virtual.items():
        table.add_row(name, vm.router.name, vm.router.kind, ", ".join(sorted(vm.targets())))
    console.print(table)
    if settings.fallbacks:
        console.print("fallbacks: " + "; ".join(f"{m} → {' → '.join(c)}" for m, c in settings.fallbacks.items()))


def register(app: typer.Typer) -> None:
    app.add_typer(router_app, name="router")
    app.command("route-eval")(route_eval)
