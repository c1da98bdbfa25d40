"""`slm-fusion merge-eval --compare-routing`: merge the specialists, or keep them and route?

For the specialists of a merge config, three ways to serve all their tasks from one gateway:
  merged            the merged model answers every question
  routed adapters   a router (the semantic router, its exemplars the tasks' dev questions) picks the specialist;
                    the specialists are LoRA adapters on one shared base (the gateway's multi-LoRA serving)
  routed models     the same router, each specialist a separate full model
Routed adapters and routed models run the same weights (an unmerged LoRA computes what its merged copy does), so they
share the accuracy column: each test question is answered by the specialist the router chose (questions routed to
another specialist are evaluated on that one, in its own format). They differ in resident memory (bytes of the weights
each setup keeps loaded) and throughput (greedy, a fixed number of new tokens per question, the same mixed batch of
test questions: one batch on the merged model, one mixed-adapter batch on the shared base, one batch per separate
model). Writes compare_routing.json / .md beside merge_eval's report and ends with a one-line recommendation.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from slm_fusion.merging.config import MergeConfig

console = Console()
KEEP = 0.9  # a merge "keeps" a skill at >= 90% of its specialist's accuracy (issue 22's bar)


@dataclass
class Setup:
    name: str
    accuracy: list[float]  # per task
    normalised: list[float]
    resident_mb: float | None  # None: not measurable here (e.g. the specialists are not adapters)
    tokens_per_s: float | None
    note: str = ""


@dataclass
class Comparison:
    tasks: list[str]
    specialist_accuracy: list[float]
    routing_accuracy: float
    confusion: dict[str, dict[str, int]]
    setups: list[Setup] = field(default_factory=list)
    recommendation: str = ""


def _is_adapter(ref: str) -> bool:
    return (Path(ref) / "adapter_config.json").exists()


def _tensor_mb(folder: Path) -> float:
    """Bytes of the tensors stored in a folder's safetensors files (what loading it keeps resident)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = st.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}.get(sl.get_dtype(), 4)
    return total / 1e6


def _model_dir(ref: str) -> Path:
    from reasonlite.models import resolve_model_dir

    return resolve_model_dir(ref)


def route_all(texts: list[str], exemplars: dict[str, list[str]]) -> list[str]:
    """The semantic router, built from the exemplars, decides for every text; returns the chosen labels."""
    from slm_fusion.routing.base import ROUTERS, RouterContext, build_router, routing_request

    # threshold -1: the nearest task's exemplars decide (the default 0.35 sent GSM8K questions that looked like no
    # dev question to the default specialist: 78% routed right in the benchmark run)
    spec = ROUTERS["semantic"].Config.model_validate({"type": "semantic", "default": next(iter(exemplars)),
                                                      "exemplars": exemplars, "threshold": -1.0})
    router = build_router("compare", spec, RouterContext(models=set(exemplars)))
    async def decide() -> list[str]:
        return [(await router.route(routing_request(text))).model for text in texts]

    return asyncio.run(decide())


def _prompts(tokenizer, questions: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


def _tokens_per_s(model, tokenizer, questions: list[str], new_tokens: int, adapter_names: list[str] | None = None
                  ) -> float:
    import torch

    enc = tokenizer(_prompts(tokenizer, questions), return_tensors="pt", padding=True)
    kwargs: dict[str, Any] = {"adapter_names": adapter_names} if adapter_names else {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id, **kwargs)
        return len(questions) * new_tokens / (time.perf_counter() - t0)


def measure_throughput(cfg: MergeConfig, merged_dir: Path, questions: list[list[str]], new_tokens: int = 32
                       ) -> dict[str, float | None]:
    """tokens/s of the three setups on the same questions (task i's questions go to specialist i)."""
    from reasonlite.models import load_model

    mixed = [q for qs in questions for q in qs]
    out: dict[str, float | None] = {}
    model, tok = load_model(str(merged_dir))
    _tokens_per_s(model, tok, mixed[:2], 4)  # warm-up
    out["merged"] = _tokens_per_s(model, tok, mixed, new_tokens)
    del model
    total_t = 0.0
    for m, qs in zip(cfg.models, questions, strict=True):
        model, tok = load_model(m.model)
        _tokens_per_s(model, tok, qs[:2], 4)
        total_t += len(qs) * new_tokens / _tokens_per_s(model, tok, qs, new_tokens)
        del model
    out["routed models"] = len(mixed) * new_tokens / total_t
    if all(_is_adapter(m.model) for m in cfg.models):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from slm_fusion.backends.lora_batch import BatchedLoRA

        base_dir = _model_dir(json.loads((Path(cfg.models[0].model) / "adapter_config.json").read_text())
                              ["base_model_name_or_path"])
        _, tok = load_model(str(base_dir))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), cfg.models[0].model,
                                          adapter_name="task0")
        for i, m in enumerate(cfg.models[1:], start=1):
            model.load_adapter(m.model, adapter_name=f"task{i}")
        model.eval()
        BatchedLoRA(model).install()  # the mixed batch as the gateway's engine runs it
        names = [f"task{i}" for i, qs in enumerate(questions) for _ in qs]
        _tokens_per_s(model, tok, mixed[:2], 4, names[:2])
        out["routed adapters"] = _tokens_per_s(model, tok, mixed, new_tokens, names)
    else:
        out["routed adapters"] = None
    return out


def resident_mb(cfg: MergeConfig, merged_dir: Path) -> dict[str, float | None]:
    out: dict[str, float | None] = {"merged": _tensor_mb(merged_dir)}
    if all(_is_adapter(m.model) for m in cfg.models):
        base_ref = json.loads((Path(cfg.models[0].model) / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = _tensor_mb(_model_dir(base_ref))
        adapters = [_tensor_mb(Path(m.model)) for m in cfg.models]
        out["routed adapters"] = base + sum(adapters)
        out["routed models"] = len(cfg.models) * base  # each specialist, its adapter folded in, is base-sized
    else:
        out["routed adapters"] = None
        out["routed models"] = sum(_tensor_mb(_model_dir(m.model)) for m in cfg.models)
    return out


def recommend(c: Comparison) -> str:
    merged = next(s for s in c.setups if s.name == "merged")
    routed = next(s for s in c.setups if s.name == "routed adapters")
    worst = min(merged.normalised)
    if worst >= KEEP:
        return (f"merge: the merged model keeps every skill (worst task {worst:.0%} of its specialist) in one model's "
                "memory")
    lost = c.tasks[merged.normalised.index(worst)]
    mem = (f" at {routed.resident_mb / merged.resident_mb:.2f}x the memory of one model"
           if routed.resident_mb and merged.resident_mb else "")
    how = "route to adapters" if routed.resident_mb else "route to the specialists"
    return (f"{how}: the merge keeps only {worst:.0%} of {lost}; routing keeps "
            f"{min(routed.normalised):.0%} of the worst task's specialist{mem}")


def compare_routing(cfg: MergeConfig, merged_dir: Path, tasks: list[tuple[str, str, list, Any, Any]], out: Path,
                    batch_size: int = 16, dev_limit: int = 50, throughput_questions: int = 4) -> Comparison:
    """`tasks`: per model (name, format, test examples, specialist EvalResult, merged EvalResult)."""
    from reasonlite.evaluate import evaluate, load_dev_data
    from reasonlite.infer import Student

    labels = [f"task{i}" for i in range(len(tasks))]
    exemplars = {label: [e.question for e in load_dev_data(m.eval.dev or m.eval.data, limit=dev_limit, seed=cfg.seed)]
                 for label, m in zip(labels, cfg.models, strict=True)}
    confusion = {label: dict.fromkeys(labels, 0) for label in labels}
    correct = [0] * len(tasks)
    total_right = total = 0
    for i, (_name, _fmt, examples, spec, _merged) in enumerate(tasks):
        chosen = route_all([e.question for e in examples], exemplars)
        own = {r["id"]: r["correct"] for r in spec.points[0].records}
        for label in chosen:
            confusion[labels[i]][label] += 1
        total_right += sum(c == labels[i] for c in chosen)
        total += len(chosen)
        correct[i] += sum(own[e.id] for e, c in zip(examples, chosen, strict=True) if c == labels[i])
        for j, label in enumerate(labels):  # misrouted questions, answered by the specialist that got them
            wrong = [e for e, c in zip(examples, chosen, strict=True) if c == label and j != i]
            if wrong:
                _, fmt_j, _, _, _ = tasks[j]
                student = Student(cfg.models[j].model, fmt=fmt_j, batch_size=batch_size, name=f"specialist-{j}")
                result = evaluate(student, wrong, budgets=[cfg.models[j].eval.budget], n=1, seed=cfg.seed,
                                  batch_size=batch_size, progress=False)
                correct[i] += result.points[0].metrics["correct"]
    spec_acc = [t[3].accuracy for t in tasks]
    routed_acc = [c / len(t[2]) for c, t in zip(correct, tasks, strict=True)]
    merged_acc = [t[4].accuracy for t in tasks]

    def norm(acc):
        return [a / s if s > 0 else (1.0 if a >= s else 0.0) for a, s in zip(acc, spec_acc, strict=True)]

    memory = resident_mb(cfg, merged_dir)
    speed = measure_throughput(cfg, merged_dir, [[e.question for e in t[2][:throughput_questions]] for t in tasks])
    c = Comparison(tasks=[t[0] for t in tasks], specialist_accuracy=spec_acc, routing_accuracy=total_right / total,
                   confusion=confusion)
    c.setups = [
        Setup("merged", merged_acc, norm(merged_acc), memory["merged"], speed["merged"]),
        Setup("routed adapters", routed_acc, norm(routed_acc), memory["routed adapters"], speed["routed adapters"],
              "" if memory["routed adapters"] else "the specialists are full models, not adapters"),
        Setup("routed models", routed_acc, norm(routed_acc), memory["routed models"], speed["routed models"]),
    ]
    c.recommendation = recommend(c)
    _write(c, out)
    return c


def _write(c: Comparison, out: Path) -> None:
    header = ["setup", *[f"{t} acc (norm.)" for t in c.tasks], "resident MB", "tok/s"]
    table = Table(title=f"merge or route? (router accuracy {c.routing_accuracy:.1%})")
    for h in header:
        table.add_column(h)
    lines = ["# Merge or route?", "", f"Router (semantic, dev-question exemplars): {c.routing_accuracy:.1%} of test "
             "questions reach their own specialist. Specialists: "
             + ", ".join(f"{t} {a:.1%}" for t, a in zip(c.tasks, c.specialist_accuracy, strict=True)), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in c.setups:
        cells = [s.name, *[f"{a:.1%} ({n:.2f})" for a, n in zip(s.accuracy, s.normalised, strict=True)],
                 f"{s.resident_mb:.0f}" if s.resident_mb else f"n/a ({s.note})",
                 f"{s.tokens_per_s:.1f}" if s.tokens_per_s else "n/a"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"**Recommendation**: {c.recommendation}"]
    console.print(table)
    console.print(f"[bold]recommendation[/bold]: {c.recommendation}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_routing.md").write_text("\n".join(lines) + "\n")
    (out / "compare_routing.json").write_text(json.dumps(asdict(c), indent=2))
