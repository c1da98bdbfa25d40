"""A verifier for distilled students (TinyGSM, Liu et al. 2023): a learned score picks the best of k sampled programs.

Three steps, top to bottom:
  1. data    sample k completions per training question from the trained student (temperature > 0), execute them
             (pal: the sandbox) and label each correct/incorrect against the gold answer. One JSONL row per question in
             `<out>/samples.jsonl`, appended as each batch finishes, so a rerun samples only the questions not there;
  2. scorer  the student backbone with a linear value head on the last token's hidden state, adapted with LoRA and
             trained with BCE on (question + program) -> P(correct), over class-balanced batches (a weak student's
             samples are mostly wrong). Checkpoints in `<out>/checkpoint` every `verifier.save_steps`; the result is
             `<out>/adapter` + `<out>/value_head.pt` + `<out>/verifier.json`, loaded by `Verifier.load(out)`;
  3. select  among one question's samples: `greedy` (the first), `vote` (majority answer), `verifier` (highest score
             among samples that produced an answer). `selection_outcomes` judges all of them and oracle pass@k on the
             SAME samples, so the comparison is at equal sampling cost.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from reasonlite import controller
from reasonlite.controller import select_index
from reasonlite.formats import build_messages
from reasonlite.jsonl import JsonlError, iter_jsonl

if TYPE_CHECKING:
    from reasonlite.config import VerifierConfig
    from reasonlite.controller import Sample, Solution
    from reasonlite.data.example import Example
    from reasonlite.infer import Student

Select = Literal["greedy", "vote", "verifier"]
SAMPLES_FILE = "samples.jsonl"
META_FILE = "verifier.json"
HEAD_FILE = "value_head.pt"
console = Console()


class VerifierError(ValueError):
    """A verifier that cannot be trained or loaded; the message names the knob or file to fix."""


def _progress(enabled: bool) -> Progress:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    return Progress(*columns, console=console, disable=not enabled, transient=False)


# --------------------------------------------------------------------------------------------------------------------
# 1. data: k samples per question, labelled by execution
# --------------------------------------------------------------------------------------------------------------------


def is_correct(sample: Any, gold: str | None) -> bool:
    """A sample is correct when it produced an answer (its program ran) and that answer matches the gold one."""
    from reasonlite.answers import answers_match

    return sample.answer is not None and sample.status != "exec_error" and answers_match(sample.answer, gold)


def scored_text(sample: Any) -> str:
    """What the scorer reads of a sample: the executed program (pal), else the completion."""
    return (sample.program or sample.text or "").strip()


def draw_samples(student: Student, questions: Sequence[str], k: int, temperature: float, max_new_tokens: int = 256,
                 budget: int | None = None, seed: int | None = None) -> list[list[Sample]]:
    """k samples per question, all drawn (no adaptive early exit: every selection rule sees the same k)."""
    if k < 1:
        raise ValueError(f"k={k}: draw at least one sample per question")
    if k > 1 and temperature <= 0:
        raise ValueError(f"temperature={temperature}: k={k} samples at temperature 0 are k copies of one; "
                         "sample at temperature > 0 (e.g. 0.7)")
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    prompts = [student.prompt(q, budget) for q in questions for _ in range(k)]
    cap = budget if budget is not None else max_new_tokens
    rows = max(1, getattr(student, "batch_size", 16))  # generated together: the student's batch size, in rows
    flat = [s for i in range(0, len(prompts), rows) for s in student.sample(prompts[i:i + rows], cap, temperature)]
    return [flat[i * k:(i + 1) * k] for i in range(len(questions))]


def read_samples(path: Path) -> dict[str, dict]:
    """Cached rows by question id. A torn last line (a killed run) is dropped and the file rewritten without it."""
    if not path.exists():
        return {}
    rows: dict[str, dict] = {}
    torn = False
    for _, row in iter_jsonl(path, errors="yield"):
        if isinstance(row, JsonlError):
            torn = True
            continue
        rows[row["id"]] = row
    if torn:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
        os.replace(tmp, path)
    return rows


def sample_training_data(student: Student, examples: Sequence[Example], path: str | Path, k: int = 8,
                         temperature: float = 0.7, max_new_tokens: int = 256, seed: int = 0,
                         progress: bool = True) -> list[dict]:
    """Sample, execute and label k completions per example; resumable through the JSONL cache at `path`.

    Returns one row per example: {id, question, gold, samples: [{text, answer, status, correct, tokens}]}.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cached = read_samples(path)
    todo = [e for e in examples if e.id not in cached]
    position = {e.id: i for i, e in enumerate(examples)}
    if any(e.answer is None for e in todo):
        bad = next(e.id for e in todo if e.answer is None)
        raise VerifierError(f"example {bad} has no gold answer: the verifier labels samples against gold answers")
    per_batch = max(1, getattr(student, "batch_size", 16) // k)  # about batch_size generated rows at a time
    with _progress(progress) as bar, path.open("a") as out:
        task = bar.add_task(f"verifier data (k={k})", total=len(examples), completed=len(examples) - len(todo))
        for start in range(0, len(todo), per_batch):
            chunk = todo[start:start + per_batch]
            drawn = draw_samples(student, [e.question for e in chunk], k, temperature, max_new_tokens,
                                 seed=seed + position[chunk[0].id])  # by position: same draw on a resumed run
            for example, samples in zip(chunk, drawn):
                row = {"id": example.id, "question": example.question, "gold": example.answer, "samples": [
                    {"text": scored_text(s), "answer": s.answer, "status": s.status,
                     "correct": is_correct(s, example.answer), "tokens": s.reasoning_tokens + s.answer_tokens}
                    for s in samples]}
                out.write(json.dumps(row) + "\n")
                cached[example.id] = row
            out.flush()
            os.fsync(out.fileno())
            bar.advance(task, len(chunk))
    return [cached[e.id] for e in examples]


# --------------------------------------------------------------------------------------------------------------------
# 2. scorer: backbone + value head, LoRA, BCE
# --------------------------------------------------------------------------------------------------------------------


def render_input(tokenizer: Any, question: str, text: str, fmt: str = "pal") -> str:
    """The scorer's input: the student's own prompt for the question and the sample as the assistant's turn."""
    messages = [*build_messages(question, fmt), {"role": "assistant", "content": text.strip()}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{messages[0]['content']}\n{text.strip()}"


def _value_scorer_class():
    import torch

    class ValueScorer(torch.nn.Module):
        """A decoder backbone (no LM head) and a linear head on the hidden state of each row's last real token."""

        def __init__(self, backbone: Any, hidden_size: int) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = torch.nn.Linear(hidden_size, 1)
            torch.nn.init.zeros_(self.head.weight)  # every sample starts at P = 0.5: no random preference
            torch.nn.init.zeros_(self.head.bias)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            last = attention_mask.sum(1) - 1  # right padding: the last real token of each row
            picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            return self.head(picked.float()).squeeze(-1)

    return ValueScorer


def _hidden_size(config: Any) -> int:
    size = getattr(config, "hidden_size", None)
    return size if size is not None else config.get_text_config().hidden_size


def build_scorer(model_ref: str | os.PathLike, lora_r: int = 8, lora_alpha: int = 16, adapter: str | Path | None = None,
                 device: str | None = None):
    """(scorer, tokenizer): the backbone of `model_ref` (alias/folder; LoRA exports are merged) with a value head,
    and fresh LoRA adapters (or the saved ones from `adapter`, frozen for inference)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from reasonlite.models import load_model

    causal, tokenizer = load_model(model_ref, device=device)
    backbone = causal.base_model  # LlamaModel & co: the decoder without its LM head
    hidden = _hidden_size(causal.config)
    if adapter is not None:
        backbone = PeftModel.from_pretrained(backbone, str(adapter))
    else:
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="FEATURE_EXTRACTION",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        backbone = get_peft_model(backbone, lora)
    scorer = _value_scorer_class()(backbone, hidden).to(causal.device)
    tokenizer.padding_side = "right"  # the head reads position sum(mask) - 1
    tokenizer.truncation_side = "left"  # an over-long input keeps the program's end: its `return` line
    return scorer, tokenizer


def _encode(tokenizer: Any, texts: list[str], max_length: int, device: Any):
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def training_items(rows: Sequence[dict]) -> list[tuple[str, str, float]]:
    """(question, text, label) per distinct sample: duplicates of one program would weigh it k times."""
    seen: dict[tuple[str, str], float] = {}
    for row in rows:
        for s in row["samples"]:
            if s["text"]:
                seen.setdefault((row["question"], s["text"]), float(s["correct"]))
    return [(q, t, y) for (q, t), y in seen.items()]


def _trainable_state(scorer: Any) -> dict:
    return {name: p.detach().cpu().clone() for name, p in scorer.named_parameters() if p.requires_grad}


def _save_checkpoint(ckpt: Path, step: int, n_items: int, scorer: Any, optimizer: Any, losses: list[float]) -> None:
    import torch

    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "state.pt.tmp"
    torch.save({"step": step, "n_items": n_items, "trainable": _trainable_state(scorer),
                "optimizer": optimizer.state_dict(), "losses": losses}, tmp)
    os.replace(tmp, ckpt / "state.pt")  # atomic: a kill mid-save keeps the previous checkpoint


def train_scorer(rows: Sequence[dict], model_ref: str | os.PathLike, out: str | Path, cfg: VerifierConfig,
                 fmt: str = "pal", progress: bool = True, device: str | None = None) -> dict:
    """Train the value-head scorer on labelled samples and export it to `out`; resumes from `out/checkpoint`."""
    import torch

    out = Path(out)
    items = training_items(rows)
    pos = [it for it in items if it[2] == 1.0]
    neg = [it for it in items if it[2] == 0.0]
    if not pos or not neg:
        kind = "incorrect" if not pos else "correct"
        raise VerifierError(
            f"all {len(items)} distinct sampled programs are {kind}: a verifier needs both kinds to learn from. "
            "Sample more (verifier.n_questions, verifier.k), at a higher verifier.temperature, or from a stronger "
            "student (--student)")
    torch.manual_seed(cfg.seed)
    scorer, tokenizer = build_scorer(model_ref, cfg.lora_r, cfg.lora_alpha, device=device)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    ckpt = out / "checkpoint"
    start, losses = 0, []
    if (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        if state["n_items"] == len(items):
            scorer.load_state_dict(state["trainable"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            start, losses = state["step"], list(state["losses"])
        else:
            console.print(f"verifier: checkpoint was trained on {state['n_items']} samples, the data now has "
                          f"{len(items)}: training from scratch")
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, linear decay; a function of the step, so resuming needs no state
        return cfg.learning_rate * min((step + 1) / warmup, max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup)))

    half = max(1, cfg.batch_size // 2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    scorer.train()
    t0 = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("verifier train", total=cfg.steps, completed=start)
        for step in range(start, cfg.steps):
            # balanced batch, drawn from a generator seeded by the step: a resumed run sees the same batches
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch = [pos[i] for i in torch.randint(len(pos), (half,), generator=g).tolist()]
            batch += [neg[i] for i in torch.randint(len(neg), (max(1, cfg.batch_size - half),), generator=g).tolist()]
            ids, mask = _encode(tokenizer, [render_input(tokenizer, q, t, fmt) for q, t, _ in batch], cfg.max_length,
                                next(scorer.parameters()).device)
            labels = torch.tensor([y for _, _, y in batch], device=ids.device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = loss_fn(scorer(ids, mask), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if (step + 1) % cfg.save_steps == 0 or step + 1 == cfg.steps:
                _save_checkpoint(ckpt, step + 1, len(items), scorer, optimizer, losses)
            bar.advance(task)
    scorer.eval()
    meta = {"base": str(model_ref), "format": fmt, "max_length": cfg.max_length, "steps": cfg.steps,
            "lora_r": cfg.lora_r, "questions": len(rows), "samples": len(items), "positives": len(pos),
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "train_seconds": time.perf_counter() - t0}
    _export(scorer, out, meta)
    return meta


def _export(scorer: Any, out: Path, meta: dict) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    scorer.backbone.save_pretrained(str(out / "adapter"))
    torch.save(scorer.head.state_dict(), out / HEAD_FILE)
    (out / META_FILE).write_text(json.dumps(meta, indent=2))


# --------------------------------------------------------------------------------------------------------------------
# 3. scoring and selection
# --------------------------------------------------------------------------------------------------------------------


class Verifier:
    """A trained scorer: `Verifier.load("runs/x/verifier").score(question, texts) -> [P(correct), ...]`."""

    def __init__(self, scorer: Any, tokenizer: Any, fmt: str = "pal", max_length: int = 512,
                 batch_size: int = 16) -> None:
        self.scorer, self.tokenizer, self.fmt = scorer.eval(), tokenizer, fmt
        self.max_length, self.batch_size = max_length, batch_size
        self.path: Path | None = None  # the folder it was loaded from (recorded in eval reports)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, batch_size: int = 16) -> Verifier:
        import torch

        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.exists():
            raise VerifierError(f"{path}: no {META_FILE} here; train one with `reasonlite verifier train CONFIG` "
                                "and point eval.verifier_path at its --out folder")
        meta = json.loads(meta_path.read_text())
        scorer, tokenizer = build_scorer(meta["base"], adapter=path / "adapter", device=device)
        scorer.head.load_state_dict(torch.load(path / HEAD_FILE, map_location="cpu"))
        scorer.to(next(scorer.backbone.parameters()).device)
        verifier = cls(scorer, tokenizer, meta.get("format", "pal"), meta.get("max_length", 512), batch_size)
        verifier.path = path
        return verifier

    def score(self, question: str, texts: Sequence[str]) -> list[float]:
        """P(correct) of each text (a program, or a completion) as the answer to `question`."""
        return self.score_many([(question, t) for t in texts])

    def score_many(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        import torch

        scores: list[float] = []
        device = next(self.scorer.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                ids, mask = _encode(self.tokenizer, [render_input(self.tokenizer, q, t, self.fmt) for q, t in chunk],
                                    self.max_length, device)
                scores += torch.sigmoid(self.scorer(ids, mask)).tolist()
        return scores

    def score_samples(self, question: str, samples: Sequence[Any]) -> list[float]:
        return self.score(question, [scored_text(s) for s in samples])


def selection_outcomes(samples: Sequence[Any], gold: str | None, scores: Sequence[float] | None = None) -> dict:
    """Whether each rule would be right on these samples: first sample, majority vote, verifier pick, oracle pass@k."""
    from reasonlite.answers import answers_match
    from reasonlite.vote import majority_vote

    vote = majority_vote([s.answer for s in samples]).answer
    out = {"first_correct": bool(samples) and is_correct(samples[0], gold),
           "vote_correct": vote is not None and answers_match(vote, gold),
           "oracle_correct": any(is_correct(s, gold) for s in samples)}
    if scores is not None:
        out["verifier_correct"] = is_correct(samples[select_index(samples, "verifier", scores)], gold)
    return out


def selection_metrics(records: Sequence[dict]) -> dict[str, float]:
    """Accuracy of each rule over eval records that carry `selection_outcomes` (all from the same samples)."""
    total = len(records) or 1
    keys = [k for k in ("first", "vote", "verifier", "oracle") if records and f"{k}_correct" in records[0]]
    return {f"{k}_accuracy": sum(bool(r[f"{k}_correct"]) for r in records) / total for k in keys}


def solve_with_verifier(student: Student, verifier: Verifier, questions: Sequence[str], golds: Sequence[str | None],
                        n: int, temperature: float, budget: int | None = None, max_new_tokens: int = 256,
                        seed: int | None = None) -> tuple[list[Solution], list[dict]]:
    """Draw n samples per question once, answer with the verifier's pick, and judge every rule on those samples."""
    t0 = time.perf_counter()
    drawn = draw_samples(student, questions, n, temperature, max_new_tokens, budget=budget, seed=seed)
    scores = verifier.score_many([(q, scored_text(s)) for q, samples in zip(questions, drawn) for s in samples])
    latency = time.perf_counter() - t0
    solutions, outcomes = [], []
    for i, (samples, gold) in enumerate(zip(drawn, golds)):
        own = scores[i * n:(i + 1) * n]
        index = select_index(samples, "verifier", own)
        solutions.append(controller.vote(samples, latency, shown_index=index))
        outcomes.append({**selection_outcomes(samples, gold, own), "verifier_score": round(own[index], 4)})
    return solutions, outcomes


# --------------------------------------------------------------------------------------------------------------------
# `reasonlite verifier train`
# --------------------------------------------------------------------------------------------------------------------


def train_verifier_command(cfg: Any, student_ref: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Sample + label (cached in `out/samples.jsonl`), train the scorer, export; a rerun resumes both steps."""
    from reasonlite.data.splits import load_splits
    from reasonlite.infer import Student, read_student_meta

    out = Path(out)
    vcfg = cfg.verifier
    examples = load_splits(cfg.data)["train"][: vcfg.n_questions]
    if not examples:
        raise VerifierError("the training split is empty: check the data section (data.n_train)")
    fmt = read_student_meta(student_ref).get("format") if Path(student_ref).is_dir() else None
    student = Student(str(student_ref), fmt=fmt or cfg.student.format, forcing=cfg.budget.forcing,
                      answer_tokens=cfg.budget.answer_tokens, batch_size=cfg.eval.batch_size)
    rows = sample_training_data(student, examples, out / SAMPLES_FILE, k=vcfg.k, temperature=vcfg.temperature,
                                max_new_tokens=vcfg.max_new_tokens, seed=vcfg.seed, progress=progress)
    correct = sum(s["correct"] for r in rows for s in r["samples"])
    total = sum(len(r["samples"]) for r in rows)
    console.print(f"verifier data: {len(rows)} questions x {vcfg.k} samples, {correct}/{total} correct "
                  f"({correct / max(1, total):.1%}), pass@{vcfg.k} "
                  f"{sum(any(s['correct'] for s in r['samples']) for r in rows) / len(rows):.1%}")
    base = vcfg.model or str(student_ref)
    del student
    meta = train_scorer(rows, base, out, vcfg, fmt=fmt or cfg.student.format, progress=progress)
    console.print(f"verifier: {out} (final loss {meta['final_loss']:.3f}, {meta['samples']} distinct samples, "
                  f"{meta['positives']} correct)")
    return meta
