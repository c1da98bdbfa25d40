"""CPU training speed: today's padded trainer vs padding-free packing vs length-grouped batches.

SmolLM2-135M-Instruct + LoRA on the same GSM8K PAL rows (gold programs from `load_gsm8k`, rows built by
`reasonlite.train.formats_data`), the same seed, steps and batch size for every variant, through the real
`run_sft`. The machine is shared, so the variants run side by side in one process and take turns one optimizer step
at a time (a turnstile callback): a load spike hits all of them alike. Measured per variant:

* real tokens/s: non-pad tokens (attention-mask sum; a packed row has no padding) over the time of steps 2..N
  (step 1 also builds the trainer, so it is left out), and the speed-up over the padded trainer;
* the computed tokens per real token (padding overhead: 1.0 means no padding);
* final train loss (mean of the last 5 logged steps) and the token-mean loss on 32 held-out GSM8K rows after
  training (same rows, padded, for every variant: the fair "same loss" check; group_by_length sees the rows in
  another order, so its per-step losses differ by design).

    python benchmarks/bench_train_speed.py            # 20 steps, batch 8
    python benchmarks/bench_train_speed.py --quick    # 4 steps, batch 4: checks the harness
    python benchmarks/bench_train_speed.py --steps 30 --batch 8 --threads 1

Writes bench-results/train_speed.json (train_speed-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console
from rich.table import Table

console = Console()
ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
STUDENT = "smollm2-135m-instruct"
VARIANTS = {"padded (today)": {}, "packing": {"packing": True}, "group_by_length": {"group_by_length": True}}
N_EVAL = 32


class Turnstile:
    """Lets one trainer at a time hold the CPU; each passes the turn on after an optimizer step."""

    def __init__(self, names: list[str]):
        self.active = list(names)
        self.current = names[0]
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)

    def pass_on(self, name: str, leave: bool = False) -> None:
        with self.cond:
            i = self.active.index(name)
            if leave:
                self.active.remove(name)
                nxt = self.active[i % len(self.active)] if self.active else None
            else:
                nxt = self.active[(i + 1) % len(self.active)]
            self.current = nxt
            self.cond.notify_all()


def _step_timer(name: str, turnstile: Turnstile, record: dict):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Times this variant's own turns; the next batch is collated inside the turn that trains on it."""

        trainer = None  # set by run_sft

        def __init__(self):
            self.t0 = time.perf_counter()
            self.tokens0 = 0

        def on_train_begin(self, args, state, control, **kwargs):
            collator = self.trainer.data_collator
            collate = collator.torch_call

            def counting(examples):  # tokens the model computes on, pads included
                batch = collate(examples)
                record["computed_tokens"] = record.get("computed_tokens", 0) + batch["input_ids"].numel()
                return batch

            collator.torch_call = counting

        def on_step_end(self, args, state, control, **kwargs):
            tokens = int(self.trainer._total_train_tokens)
            record["steps"].append({"seconds": time.perf_counter() - self.t0, "tokens": tokens - self.tokens0})
            self.tokens0 = tokens
            step = record["steps"][-1]
            console.print(f"[dim]{name}: step {state.global_step}/{state.max_steps} {step['seconds']:.1f}s "
                          f"{step['tokens']} tokens[/dim]")
            last = state.global_step >= state.max_steps
            turnstile.pass_on(name, leave=last)
            if not last:
                turnstile.wait(name)
                self.t0 = time.perf_counter()

    return StepTimer()


def _pal_examples(n: int):
    """The first `n` GSM8K train questions whose solution gives a verified program (read only as far as needed)."""
    import itertools

    from reasonlite.data.gsm8k import load_gsm8k

    lines = GSM8K.read_text().splitlines(keepends=True)
    for size in itertools.count(1):  # load_gsm8k derives a program per row (slow): give it a prefix of the file
        head = Path(tempfile.mkdtemp(prefix="gsm8k-head-")) / "train.jsonl"
        head.write_text("".join(lines[: 2 * n * size]))
        examples = [e for e in load_gsm8k(head) if e.program]
        if len(examples) >= n or 2 * n * size >= len(lines):
            return examples[:n]


def _eval_loss(model, tokenizer, rows) -> float:
    """Token-mean loss over held-out rows, padded batches of 8 (the same batches for every variant)."""
    import torch

    from reasonlite.train.sft import WeightedCollator

    collate = WeightedCollator(pad_token_id=tokenizer.pad_token_id)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = collate(rows[i:i + 8])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch, use_cache=False).loss) * n
            count += n
    return total / count


def run(quick: bool = False, steps: int | None = None, batch: int | None = None, threads: int | None = None) -> dict:
    import torch

    from reasonlite.config import build_config
    from reasonlite.models import load_model, load_tokenizer
    from reasonlite.train.formats_data import build_dataset, tokenize_example, trace_examples
    from reasonlite.train.sft import prepare_model, run_sft

    steps = steps or (4 if quick else 20)
    batch = batch or (4 if quick else 8)
    threads = threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    base = {"student": {"model": STUDENT, "format": "pal", "lora_r": 16, "lora_alpha": 32},
            "train": {"max_steps": steps, "batch_size": batch, "learning_rate": 2e-3, "max_length": 512,
                      "warmup_ratio": 0.0, "save_steps": 100_000, "epochs_cap": 1, "num_threads": threads}}
    cfgs = {name: build_config({**base, "train": {**base["train"], **extra}}) for name, extra in VARIANTS.items()}
    first = next(iter(cfgs.values()))
    tokenizer = load_tokenizer(STUDENT)
    gsm8k = _pal_examples(steps * batch + N_EVAL)
    examples, _ = trace_examples(first, gsm8k[: steps * batch], tokenizer)
    dataset = build_dataset(first, examples, tokenizer)
    held_out, _ = trace_examples(first, gsm8k[steps * batch:], tokenizer)
    eval_rows = [{k: v for k, v in tokenize_example(tokenizer, ex).items() if k != "prompt_len"} for ex in held_out]

    turnstile = Turnstile(list(cfgs))
    records: dict[str, dict] = {name: {"steps": []} for name in cfgs}
    models = {}
    for name, cfg in cfgs.items():  # every variant starts from the same seeded LoRA init
        model, _ = load_model(STUDENT, device="cpu")
        models[name] = prepare_model(cfg, model)
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-speed-"))

    def train(name: str) -> None:
        turnstile.wait(name)
        try:
            records[name]["run"] = run_sft(cfgs[name], models[name], tokenizer, dataset, workdir / name.split()[0],
                                           callbacks=[_step_timer(name, turnstile, records[name])])
        except BaseException as e:  # noqa: BLE001 - reported in the table, the other variants keep their turns
            records[name]["error"] = f"{type(e).__name__}: {e}"
            if name in turnstile.active:
                turnstile.pass_on(name, leave=True)

    threads_ = [threading.Thread(target=train, args=(name,), name=name) for name in cfgs]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()

    table, baseline_tps = [], None
    for name, cfg in cfgs.items():
        rec = records[name]
        if "error" in rec:
            table.append({"variant": name, "error": rec["error"]})
            continue
        timed = rec["steps"][1:] or rec["steps"]
        tps = sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed)
        baseline_tps = baseline_tps or tps
        losses = [h["loss"] for h in rec["run"].history]
        table.append({
            "variant": name, "steps": rec["run"].steps, "real_tokens": sum(s["tokens"] for s in rec["steps"]),
            "tokens_per_s": round(tps, 1), "speedup": round(tps / baseline_tps, 2),
            "s_per_step_median": round(statistics.median(s["seconds"] for s in timed), 2),
            "computed_per_real_token": round(rec["computed_tokens"] / sum(s["tokens"] for s in rec["steps"]), 3),
            "final_train_loss": round(statistics.mean(losses[-5:]), 4), "last_step_loss": round(losses[-1], 4),
            "heldout_loss": round(_eval_loss(models[name], tokenizer, eval_rows), 4),
        })
    result = {"table": table, "settings": {"student": STUDENT, "steps": steps, "batch_size": batch, "rows": len(dataset),
                                           "heldout_rows": len(eval_rows), "threads": threads, "lora_r": 16,
                                           "max_length": 512, "data": "GSM8K train PAL (gold programs)"}}
    _print(table)
    out = ROOT / "bench-results" / ("train_speed-quick.json" if quick else "train_speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return result


def _print(table: list[dict]) -> None:
    t = Table(title="CPU training speed (SmolLM2-135M LoRA, GSM8K PAL, variants interleaved step by step)")
    cols = ["variant", "tokens_per_s", "speedup", "s_per_step_median", "computed_per_real_token", "final_train_loss",
            "last_step_loss", "heldout_loss"]
    for c in cols:
        t.add_column(c)
    for row in table:
        t.add_row(*[str(row.get(c, row.get("error", "") if c == "tokens_per_s" else "")) for c in cols])
    console.print(t)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--threads", type=int)
    a = parser.parse_args()
    run(quick=a.quick, steps=a.steps, batch=a.batch, threads=a.threads)
