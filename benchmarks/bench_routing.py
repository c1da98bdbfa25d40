"""Routing benchmark: decision latency and accuracy of the `semantic` and `classifier` routers, and a cascade.

Three specialists — `retail` (our retail-math generator), `math` (GSM8K) and `general` (hand-written coding, trivia,
writing and chit-chat prompts) — with disjoint train/test prompts (`slm_fusion.routing.evaluate.labelled_mix`).
Targets: decision p50 <= 5 ms on CPU with the embedding included (cache cleared before every decision), accuracy
>= 95% on the held-out mix. Every router is measured with the embedder on 1 intra-op thread (the default) and on 2
(`routing.embedding_threads: 2`). Classifiers are trained with `single_fit=True` (one LR per decision).

Cascade: on held-out retail-math questions a PAL student (a trained one from runs/ when present, else base
SmolLM2-135M-Instruct with the PAL prompt) samples 3 programs; they are executed and vote. Low agreement, a failing
program or no answer escalates to the big model. No larger model exists offline, so the big model is an oracle
stand-in that returns the dataset's gold PAL program (the project's default "dataset teacher"): the curve therefore
shows how well the small model's confidence separates its right answers from its wrong ones, and what escalating
costs. Every threshold is replayed on the same generations (RouteLLM style).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

console = Console(width=150)
OUT = Path("bench-results/routing")
SPECIALISTS = ("retail", "math", "general")


def find_pal_student() -> Path | None:
    """The newest exported student trained with the PAL format under runs/, if any."""
    from reasonlite.infer import read_student_meta

    candidates = []
    for meta in Path("runs").glob("**/reasonlite.json"):
        if read_student_meta(meta.parent).get("format") == "pal":
            candidates.append(meta.parent)
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _train_classifiers(train_file: Path, router_file: Path, int8_file: Path):
    """The fp32 and int8 classifier router files (single fit: one LR per decision); returns (fp32 bundle, seconds)."""
    from slm_fusion.routing.base import load_labelled
    from slm_fusion.routing.classifier import train_classifier

    t0 = time.perf_counter()
    bundle = train_classifier(load_labelled(train_file), router_file, single_fit=True)
    train_s = time.perf_counter() - t0
    train_classifier(load_labelled(train_file), int8_file, embedding="all-minilm-l6-v2-int8", single_fit=True)
    return bundle, train_s


def _routers(train_file: Path, router_file: Path, int8_file: Path, threads: int = 1):
    from slm_fusion.config import FusionConfig
    from slm_fusion.routing import build_routers

    models = [{"name": n, "backend": "openai", "model": n, "base_url": "http://127.0.0.1:9/v1"} for n in SPECIALISTS]
    cfg = FusionConfig.model_validate({"models": models, "routing": {"embedding_threads": threads}, "virtual_models": {
        "semantic-knn": {"router": "semantic", "default": "general", "method": "knn", "k": 3, "threshold": 0.2,
                         "exemplars_file": str(train_file)},
        "semantic-centroid": {"router": "semantic", "default": "general", "method": "centroid", "threshold": 0.2,
                              "exemplars_file": str(train_file)},
        "classifier": {"router": "classifier", "path": str(router_file)},
        "semantic-knn-int8": {"router": "semantic", "default": "general", "method": "knn", "k": 3, "threshold": 0.2,
                              "exemplars_file": str(train_file), "embedding": "all-minilm-l6-v2-int8"},
        "classifier-int8": {"router": "classifier", "path": str(int8_file)},
    }})
    return build_routers(cfg)


def _warm_latency(router, rows, repeats: int = 1) -> float:
    """p50 ms when the embedding is already cached (a second router consulted for the same request)."""
    import numpy as np

    from slm_fusion.routing.base import RoutingRequest

    async def timed() -> list[float]:  # one event loop for all decisions, as in the gateway
        ts = []
        for r in rows:
            req = RoutingRequest(messages=[{"role": "user", "content": r.prompt}], text=r.prompt)
            await router.route(req)  # fills the cache
            t0 = time.perf_counter()
            await router.route(req)
            ts.append((time.perf_counter() - t0) * 1000)
        return ts

    return float(np.percentile(asyncio.run(timed()), 50))


async def _cascade(n_questions: int, samples: int, seed: int) -> dict[str, Any]:
    from reasonlite.data.retail_math import generate_retail_math
    from reasonlite.formats import build_messages
    from slm_fusion.backends.base import Generation, GenerationRequest, make_backend
    from slm_fusion.config import TransformersModel
    from slm_fusion.routing.base import LabelledPrompt
    from slm_fusion.routing.evaluate import cascade_curve, cascade_outcomes, plot_cascade

    student = find_pal_student()
    small_model = str(student) if student else "smollm2-135m-instruct"
    questions = generate_retail_math(n_questions, seed=seed)
    gold_program = {e.question: e.program for e in questions}
    backend = make_backend(TransformersModel(name="small", backend="transformers", model=small_model,
                                             max_batch_size=samples, batch_wait_ms=0, torch_threads=2))
    t0 = time.perf_counter()
    await backend.start()
    load_s = time.perf_counter() - t0
    rows = [LabelledPrompt(e.question, "retail", e.answer) for e in questions]
    by_prompt = {build_messages(e.question, "pal")[0]["content"]: e.question for e in questions}

    async def generate(model: str, messages: list[dict], n: int, temperature: float) -> list[Any]:
        if model == "small":
            return await backend.generate(GenerationRequest(messages=messages, n=n, temperature=temperature,
                                                            max_tokens=200, seed=seed))
        program = gold_program[by_prompt[messages[-1]["content"]]]  # oracle stand-in for a large model
        return [Generation(text=program, finish_reason="stop", prompt_tokens=0, completion_tokens=0)]

    from rich.progress import Progress

    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("cascade: small model samples", total=len(rows))
        outcomes = await cascade_outcomes(
            generate, rows, "small", "big", samples=samples, temperature=0.7,
            messages_for=lambda model, prompt: build_messages(prompt, "pal"),
            progress=lambda: progress.advance(task),
        )
    gen_s = time.perf_counter() - t0
    await backend.aclose()
    curve = cascade_curve(outcomes, thresholds=[0.0, 0.34, 0.5, 0.67, 0.9, 1.0])
    OUT.mkdir(parents=True, exist_ok=True)
    plot = plot_cascade(curve, OUT / "cascade_curve.png", title=f"retail-math: {Path(small_model).name} → oracle")
    at = next(c for c in curve if c["threshold"] == 0.67)
    return {
        "small_model": small_model, "pal_student_found": student is not None, "big_model": "oracle (gold program)",
        "n": len(outcomes), "samples": samples, "threshold": 0.67, "accuracy": at["accuracy"],
        "escalated": at["escalated"], "small_only_accuracy": curve[-2]["accuracy"],
        "exec_errors": sum(1 for o in outcomes if o["exec_error"]), "no_answer": sum(o["no_answer"] for o in outcomes),
        "small_correct_when_kept": _kept_precision(outcomes, 0.67),
        "curve": curve, "plot": str(plot), "model_load_s": round(load_s, 1), "generation_s": round(gen_s, 1),
    }


def _kept_precision(outcomes: list[dict], threshold: float) -> float | None:
    kept = [o for o in outcomes if not (o["exec_error"] or o["no_answer"] or o["agreement"] < threshold)]
    return sum(o["small_correct"] for o in kept) / len(kept) if kept else None


def run(quick: bool = False, cascade: bool = True) -> dict[str, Any]:
    import torch

    from slm_fusion.routing.embeddings import get_embedder
    from slm_fusion.routing.evaluate import cascade_table, evaluate_router, labelled_mix, write_labelled

    # One thread: a decision is one small forward, and on a shared 2-core box extra threads only spin and contend.
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    n_train, n_test = (40, 30) if quick else (150, 100)
    # GSM8K is far more varied than the templated retail problems, so it gets more exemplars.
    train = labelled_mix("train", n_train, 3 * n_train, seed=0)
    test = labelled_mix("test", n_test, n_test, seed=1)
    train_file = write_labelled(train, OUT / "train.jsonl")
    write_labelled(test, OUT / "test.jsonl")
    t0 = time.perf_counter()
    get_embedder()
    embed_load_s = time.perf_counter() - t0
    files = (train_file, OUT / "router.pkl", OUT / "router-int8.pkl")
    bundle, train_s = _train_classifiers(*files)
    virtual = _routers(*files)
    results_runtime = get_embedder().runtime
    # The same routers again with a 2-thread embedder (the classifier files are reused: same embedding model).
    for name, vm in _routers(*files, threads=2).items():
        virtual[f"{name} (2 thr)"] = vm

    table = Table(title=f"routing on {len(test)} held-out prompts ({len(train)} train)")
    for col in ("router", "accuracy", "p50 ms", "p99 ms", "p50 ms (cached emb.)", "retail", "math", "general"):
        table.add_column(col, no_wrap=col == "router")
    results: dict[str, Any] = {"n_train": len(train), "n_test": len(test), "embedding_load_s": round(embed_load_s, 1),
                               "classifier_train_s": round(train_s, 1), "calibrated": bundle["calibrated"],
                               "embedding_runtime": results_runtime,
                               "routers": {}, "table": []}
    for name, vm in virtual.items():
        r = asyncio.run(evaluate_router(vm.router, test))
        r["latency_ms"]["p50_cached_embedding"] = _warm_latency(vm.router, test[:50])
        r["meets_latency_target"] = r["latency_ms"]["p50"] <= 5.0
        r["meets_accuracy_target"] = r["accuracy"] >= 0.95
        results["routers"][name] = r
        pc = r["per_class_accuracy"]
        row = {"router": name, "accuracy": round(r["accuracy"], 4), "p50_ms": round(r["latency_ms"]["p50"], 2),
               "p99_ms": round(r["latency_ms"]["p99"], 2),
               "p50_cached_ms": round(r["latency_ms"]["p50_cached_embedding"], 3),
               **{k: round(pc.get(k, 0.0), 3) for k in SPECIALISTS}}
        results["table"].append(row)
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)

    if cascade:
        c = asyncio.run(_cascade(n_questions=6 if quick else 12, samples=3, seed=7))
        results["cascade"] = c
        console.print(cascade_table(
            c["curve"], f"cascade {Path(c['small_model']).name} → {c['big_model']} on {c['n']} retail-math questions"))
        results["table"].append({"router": f"cascade@{c['threshold']}", "accuracy": round(c["accuracy"], 4),
                                 "p50_ms": "", "p99_ms": "", "p50_cached_ms": "",
                                 "retail": f"escalated {c['escalated']:.2f}", "math": "", "general": ""})
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
