"""`slm-fusion route-eval`: how well the routers route, how fast, and what a cascade costs versus what it gains.

For every routing virtual model in the config (rules / semantic / classifier): accuracy against the labelled
`model` column, confusion matrix, and decision latency (p50/p99, embedding included). When rows carry a gold
`answer` and the config has a cascade, the cheap model's completions and the expensive model's answers are computed
once, and every escalation threshold is replayed on them offline (as RouteLLM does): fraction sent to the bigger
model vs accuracy, as a table and a PNG curve. Writes `route_eval.json`, `route_eval.md` and `cascade_curve.png`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from slm_fusion.routing.base import LabelledPrompt, Router, RoutingRequest
from slm_fusion.routing.cascade import Assessment, assess_sync, low_confidence

GENERAL_PROMPTS = [
    # coding
    "Write a Python function that reverses a linked list.",
    "How do I read a CSV file with pandas and drop rows with missing values?",
    "Explain the difference between a list and a tuple in Python.",
    "Why does my JavaScript fetch call return a pending Promise?",
    "Write a SQL query that finds the second highest salary in an employees table.",
    "What does the `yield` keyword do in Python?",
    "How can I undo the last git commit but keep my changes?",
    "Fix this error: TypeError: 'NoneType' object is not subscriptable.",
    "Write a bash one-liner that counts lines in all .py files recursively.",
    "What is the time complexity of binary search and why?",
    "Show me how to make an HTTP POST request in Go.",
    "Explain what a race condition is with a short example.",
    "How do I center a div horizontally and vertically with CSS flexbox?",
    "Write a Rust function that parses an integer from a string and handles errors.",
    "What is dependency injection and when should I use it?",
    "Convert this for loop into a list comprehension: for x in items: if x > 0: out.append(x * 2)",
    "How do Docker volumes differ from bind mounts?",
    "Write a regular expression that matches an email address.",
    "Explain the CAP theorem in simple terms.",
    "What is the difference between TCP and UDP?",
    "How do I write a unit test with pytest that checks an exception is raised?",
    "Refactor this function to avoid deep nesting of if statements.",
    "What are Python decorators and how do I write one?",
    "Explain how garbage collection works in Java.",
    "Write a React component that shows a counter with increment and decrement buttons.",
    # trivia / knowledge
    "Who painted the Mona Lisa?",
    "What is the capital of Australia?",
    "When did the Berlin Wall fall?",
    "Which planet has the most moons?",
    "Who wrote 'One Hundred Years of Solitude'?",
    "What causes the northern lights?",
    "How does photosynthesis work?",
    "What is the tallest mountain in Africa?",
    "Why is the sky blue?",
    "Who was the first woman to win a Nobel Prize?",
    "What language is spoken in Brazil?",
    "Explain the theory of evolution by natural selection.",
    "What is the difference between a virus and a bacterium?",
    "Which ocean is the deepest?",
    "What was the Renaissance?",
    "How do vaccines train the immune system?",
    "What is the speed of light in a vacuum?",
    "Who composed the Four Seasons?",
    "What is the largest desert in the world?",
    "Explain what inflation means in economics.",
    "What is quantum entanglement, in plain language?",
    "Why did the Roman Empire fall?",
    "What are black holes made of?",
    "Name three works by Shakespeare and summarise one.",
    "How many players are on a soccer team on the field?",
    # writing
    "Write a short poem about autumn leaves.",
    "Draft a polite email asking my manager for a day off next Friday.",
    "Write a product description for a handmade ceramic coffee mug.",
    "Summarise the plot of Pride and Prejudice in three sentences.",
    "Write a cover letter opening for a junior data analyst position.",
    "Give me five creative names for a bakery.",
    "Rewrite this sentence to sound more formal: hey, can u send me the report asap?",
    "Write a haiku about the ocean at night.",
    "Compose a birthday message for my grandmother turning ninety.",
    "Write the opening paragraph of a mystery novel set in Venice.",
    "Help me write a toast for my best friend's wedding.",
    "Write a limerick about a cat who loves coffee.",
    "Create a catchy slogan for a recycling campaign.",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "Write a two-sentence horror story.",
    "Proofread this paragraph and fix grammar mistakes: their going to the park tomorow.",
    "Write a LinkedIn post announcing that I started a new job.",
    "Outline an essay about the impact of social media on teenagers.",
    "Write a thank-you note to a teacher.",
    "Describe a sunset over the desert using vivid imagery.",
    "Write a short bedtime story about a brave little turtle.",
    "Give me a persuasive argument for a four-day work week.",
    "Write a tweet announcing our café's new vegan menu.",
    "Suggest a title for a blog post about learning to cook.",
    "Write song lyrics for a chorus about summer road trips.",
    # chit-chat / advice
    "Hi! How are you doing today?",
    "Tell me a joke.",
    "I'm feeling stressed about exams, any tips?",
    "What should I cook for dinner tonight?",
    "Can you recommend a good science fiction book?",
    "What's a fun weekend activity for a rainy day?",
    "How can I improve my sleep?",
    "Do you have any tips for learning a new language?",
    "What are some good habits for staying productive when working from home?",
    "I just adopted a puppy. What should I know?",
    "What is your favourite movie and why?",
    "How do I politely decline an invitation?",
    "Give me ideas for a first date.",
    "What should I pack for a week-long hiking trip?",
    "How do I start meditating?",
    "Any advice for a job interview tomorrow?",
    "Suggest some houseplants that are hard to kill.",
    "How do I deal with a difficult coworker?",
    "What are some good stretches after running?",
    "Good night, talk to you tomorrow!",
    "Can you help me plan a three-day trip to Rome?",
    "What's the best way to keep a conversation going?",
    "Recommend a podcast about history.",
    "How do I make my own sourdough starter?",
    "What board games are good for a family night?",
    "Thanks for your help earlier!",
    "What's the weather usually like in Iceland in March?",
    "Can you explain the rules of chess briefly?",
    "What are the pros and cons of electric cars?",
    "How do I get better at public speaking?",
]


# ------------------------------------------------------------------------------------------------ labelled data


def labelled_mix(split: str = "train", n_retail: int = 60, n_math: int = 60, n_general: int | None = None,
                 seed: int = 0, gsm8k_dir: str | Path | None = None) -> list[LabelledPrompt]:
    """Three specialists: `retail` (our retail-math generator), `math` (GSM8K) and `general` (GENERAL_PROMPTS).

    `train` and `test` never share a prompt: retail draws use different seeds, GSM8K uses its own train/test files,
    and the general prompts are split 60/40 after a fixed shuffle.
    """
    from reasonlite.data.gsm8k import load_gsm8k
    from reasonlite.data.retail_math import generate_retail_math
    from reasonlite.data.splits import default_gsm8k_dir

    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    gsm_dir = Path(gsm8k_dir) if gsm8k_dir else default_gsm8k_dir()
    retail = generate_retail_math(n_retail, seed=seed * 2 + (0 if split == "train" else 1) + 1000)
    math_rows = load_gsm8k(gsm_dir, split=split)
    rng = random.Random(seed)
    math_rows = rng.sample(math_rows, min(n_math, len(math_rows)))
    general = list(GENERAL_PROMPTS)
    random.Random(1234).shuffle(general)
    cut = int(len(general) * 0.6)
    general = general[:cut] if split == "train" else general[cut:]
    if n_general is not None:
        general = general[:n_general]
    rows = [LabelledPrompt(e.question, "retail", e.answer) for e in retail]
    rows += [LabelledPrompt(e.question, "math", e.answer) for e in math_rows]
    rows += [LabelledPrompt(p, "general") for p in general]
    rng.shuffle(rows)
    return rows


def write_labelled(rows: list[LabelledPrompt], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            obj = {"prompt": r.prompt, "model": r.model}
            if r.answer is not None:
                obj["answer"] = r.answer
            f.write(json.dumps(obj) + "\n")
    return path


# --------------------------------------------------------------------------------------------- routing accuracy


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


async def evaluate_router(router: Router, rows: list[LabelledPrompt], warmup: int = 3) -> dict[str, Any]:
    """Accuracy, confusion matrix and decision latency of one router on labelled rows.

    Latency is per decision as the gateway awaits it, embedding (and its thread hop) included: the embedding cache
    is bypassed by clearing it between rows, so every decision pays the full cost a new prompt pays.
    """
    embedder = getattr(router, "embedder", None)
    for r in rows[:warmup]:
        await router.route(RoutingRequest(messages=[{"role": "user", "content": r.prompt}], text=r.prompt))
    latencies, predicted = [], []
    for r in rows:
        if embedder is not None:
            embedder.clear_cache()
        request = RoutingRequest(messages=[{"role": "user", "content": r.prompt}], text=r.prompt)
        t0 = time.perf_counter()
        decision = await router.route(request)
        latencies.append((time.perf_counter() - t0) * 1000)
        predicted.append(decision.model)  # always a configured model name, whichever way the router decided
    # Scored in model space, as served: a gold class label (`math`) counts as the model its `labels:` map names,
    # so a default decision (no label) and a recognised class meet on the same names.
    to_model = getattr(getattr(router, "cfg", None), "labels", None) or {}
    gold = [to_model.get(r.model, r.model) for r in rows]
    labels = sorted(set(gold) | set(predicted))
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for g, p in zip(gold, predicted, strict=True):
        confusion[g][p] += 1
    per_class = {g: confusion[g][g] / max(1, sum(confusion[g].values())) for g in sorted(set(gold))}
    accuracy = sum(g == p for g, p in zip(gold, predicted, strict=True)) / max(1, len(rows))
    return {
        "router": router.name, "kind": getattr(router, "kind", ""), "n": len(rows), "accuracy": accuracy,
        "per_class_accuracy": per_class, "confusion": confusion, "labels": labels,
        "latency_ms": {"p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
                       "mean": float(np.mean(latencies)) if latencies else float("nan")},
    }


# ------------------------------------------------------------------------------------------------ cascade curve

# `call(model, messages, n, temperature) -> list[Generation]`
GenerateFn = Callable[[str, list[dict[str, str]], int, float], Awaitable[list[Any]]]


async def cascade_outcomes(
    generate: GenerateFn, rows: list[LabelledPrompt], small: str, big: str, *, samples: int = 3,
    temperature: float = 0.7, messages_for: Callable[[str, str], list[dict[str, str]]] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Per row with a gold answer: the small model's confidence and correctness, and the big model's correctness."""
    from reasonlite.answers import answers_match

    messages_for = messages_for or (lambda model, prompt: [{"role": "user", "content": prompt}])
    out = []
    for r in rows:
        if r.answer is None:
            continue
        small_gens = await generate(small, messages_for(small, r.prompt), samples, temperature if samples > 1 else 0.0)
        a: Assessment = await asyncio.to_thread(assess_sync, small_gens)
        big_gens = await generate(big, messages_for(big, r.prompt), 1, 0.0)
        b = await asyncio.to_thread(assess_sync, big_gens)
        out.append({
            "prompt": r.prompt[:200], "gold": r.answer, "small_answer": a.answer, "agreement": a.agreement,
            "exec_error": a.exec_error, "no_answer": a.no_answer,
            "small_correct": a.answer is not None and answers_match(a.answer, r.answer),
            "big_answer": b.answer, "big_correct": b.answer is not None and answers_match(b.answer, r.answer),
        })
        if progress:
            progress()
    return out


def cascade_curve(outcomes: list[dict[str, Any]], thresholds: list[float] | None = None,
                  signals: tuple[str, ...] = ("agreement", "exec_error", "no_answer")) -> list[dict[str, float]]:
    """Replay each threshold: escalate when the small model is not confident; accuracy vs fraction escalated."""
    thresholds = thresholds if thresholds is not None else [round(t, 2) for t in np.linspace(0.0, 1.0, 11)]
    rows = []
    for t in thresholds:
        escalated = correct = 0
        for o in outcomes:
            a = Assessment(answers=[], answer=o["small_answer"], agreement=o["agreement"], winner=None,
                           exec_errors=[o["exec_error"]], no_answer=o["no_answer"])
            if low_confidence(a, t, set(signals)):
                escalated += 1
                correct += o["big_correct"]
            else:
                correct += o["small_correct"]
        n = max(1, len(outcomes))
        rows.append({"threshold": t, "escalated": escalated / n, "accuracy": correct / n})
    n = max(1, len(outcomes))
    rows.append({"threshold": "small only", "escalated": 0.0, "accuracy": sum(o["small_correct"] for o in outcomes) / n})
    rows.append({"threshold": "big only", "escalated": 1.0, "accuracy": sum(o["big_correct"] for o in outcomes) / n})
    return rows


def cascade_table(curve: list[dict[str, Any]], title: str):
    """The cascade curve as a rich table (threshold, fraction sent to the big model, accuracy)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("threshold", "sent to big", "accuracy"):
        table.add_column(col)
    for p in curve:
        table.add_row(str(p["threshold"]), f"{p['escalated']:.2f}", f"{p['accuracy']:.3f}")
    return table


def plot_cascade(curve: list[dict[str, Any]], path: str | Path, title: str = "cascade") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [c for c in curve if isinstance(c["threshold"], float | int)]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([c["escalated"] for c in pts], [c["accuracy"] for c in pts], "o-", label="cascade (agreement threshold)")
    for c in pts:
        ax.annotate(f"{c['threshold']:.1f}", (c["escalated"], c["accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ends = [c for c in curve if not isinstance(c["threshold"], float | int)]
    ax.plot([c["escalated"] for c in ends], [c["accuracy"] for c in ends], "k--", alpha=0.5, label="small only → big only")
    ax.set_xlabel("fraction sent to the bigger model")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- reports


def markdown_report(result: dict[str, Any]) -> str:
    lines = ["# Routing evaluation", ""]
    for r in result.get("routers", []):
        lines += [f"## {r['virtual_model']} ({r['kind']} router `{r['router']}`)", "",
                  (f"accuracy **{r['accuracy']:.3f}** on {r['n']} prompts; decision latency p50 "
                  f"{r['latency_ms']['p50']:.2f} ms, p99 {r['latency_ms']['p99']:.2f} ms"), "",
                  "| gold \\ routed | " + " | ".join(r["labels"]) + " |",
                  "|---|" + "---|" * len(r["labels"])]
        for g, row in r["confusion"].items():
            lines.append(f"| {g} | " + " | ".join(str(row[p]) for p in r["labels"]) + " |")
        lines.append("")
    for c in result.get("cascades", []):
        lines += [f"## cascade `{c['name']}`: {c['small']} → {c['big']} ({c['n']} answerable prompts)", "",
                  "| threshold | sent to big | accuracy |", "|---|---|---|"]
        for p in c["curve"]:
            t = p["threshold"] if isinstance(p["threshold"], str) else f"{p['threshold']:.2f}"
            lines.append(f"| {t} | {p['escalated']:.2f} | {p['accuracy']:.3f} |")
        lines += ["", f"![cascade curve]({Path(c['plot']).name})" if c.get("plot") else "", ""]
    return "\n".join(lines)


def write_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "route_eval.json", "md": out_dir / "route_eval.md"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    paths["md"].write_text(markdown_report(result))
    return paths


# -------------------------------------------------------------------------------------------------- the command


def run_route_eval(config_path: str | Path, data: str | Path, out_dir: str | Path,
                   only: list[str] | None = None, max_answerable: int | None = None) -> dict[str, Any]:
    """Evaluate the virtual models of a gateway config on a labelled JSONL (see module docstring)."""
    from slm_fusion.config import load_fusion_config
    from slm_fusion.routing import build_routers, load_labelled
    from slm_fusion.routing.cascade import CascadeRouter

    cfg = load_fusion_config(config_path)
    virtual = build_routers(cfg)
    rows = load_labelled(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"config": str(config_path), "data": str(data), "n_rows": len(rows), "routers": [],
                              "cascades": []}
    for name, vm in virtual.items():
        if only and name not in only:
            continue
        router = vm.router
        if isinstance(router, CascadeRouter):
            answerable = [r for r in rows if r.answer is not None][:max_answerable]
            if not answerable:
                continue
            small, big = router.cfg.models[0], router.cfg.models[-1]
            outcomes = asyncio.run(_outcomes_from_config(cfg, answerable, small, big, router.cfg.samples,
                                                         router.cfg.temperature))
            curve = cascade_curve(outcomes)
            plot = plot_cascade(curve, out_dir / f"cascade_curve_{name}.png", title=f"{name}: {small} → {big}")
            result["cascades"].append({"name": name, "small": small, "big": big, "n": len(outcomes),
                                       "curve": curve, "plot": str(plot), "outcomes": outcomes})
            continue
        if getattr(router, "kind", "") == "fusion":
            continue
        report = asyncio.run(evaluate_router(router, rows))
        report["virtual_model"] = name
        result["routers"].append(report)
    paths = write_report(result, out_dir)
    result["files"] = {k: str(v) for k, v in paths.items()}
    return result


async def _outcomes_from_config(cfg: Any, rows: list[LabelledPrompt], small: str, big: str, samples: int,
                                temperature: float) -> list[dict[str, Any]]:
    from slm_fusion.backends.base import GenerationRequest, make_backend

    backends = {m.name: make_backend(m) for m in cfg.models if m.name in (small, big)}
    for b in backends.values():
        await b.start()
    try:
        async def generate(model: str, messages: list[dict[str, str]], n: int, temperature: float) -> list[Any]:
            b = backends[model]
            return await b.generate(GenerationRequest(messages=messages, n=n, temperature=temperature,
                                                      max_tokens=b.config.default_max_tokens))

        return await cascade_outcomes(generate, rows, small, big, samples=samples, temperature=temperature)
    finally:
        for b in backends.values():
            await b.aclose()
