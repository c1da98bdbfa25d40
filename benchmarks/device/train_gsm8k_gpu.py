"""Train the GSM8K PAL student (SmolLM2-135M-Instruct + LoRA) on one CUDA device, bf16, large packed batches.

Run by `train_gsm8k_gpu.sh` on a lent GPU machine; never needed by the tests. It goes through the same
`formats_data` rows and `run_sft` as the CPU pipeline (precision from `precision_kwargs`: bf16 autocast on CUDA),
stops at `--max-steps` or after `--time-limit` seconds of training, whichever comes first, then writes to `--out`:
metrics.json (steps, tokens/s, loss history, held-out loss, GPU name and peak memory) and the LoRA adapter in bf16.

    python benchmarks/device/train_gsm8k_gpu.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, HF folder or GGUF file")
    parser.add_argument("--data", required=True, help="folder with GSM8K train.jsonl / test.jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--time-limit", type=float, default=360, help="stop training after this many seconds")
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--heldout", type=int, default=256, help="GSM8K test rows for the held-out loss")
    a = parser.parse_args()

    import torch
    from transformers import TrainerCallback

    from reasonlite.config import build_config
    from reasonlite.data.gsm8k import load_gsm8k
    from reasonlite.models import load_model
    from reasonlite.train.formats_data import build_dataset, tokenize_example, trace_examples
    from reasonlite.train.sft import WeightedCollator, precision_kwargs, prepare_model, run_sft

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script is for a lent GPU machine (CPU training: reasonlite train)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = build_config({
        "student": {"model": a.model, "format": "pal", "lora_r": 16, "lora_alpha": 32},
        "train": {"max_steps": a.max_steps, "batch_size": a.batch, "learning_rate": a.lr, "max_length": 512,
                  "warmup_ratio": 0.03, "save_steps": 100_000, "packing": not a.no_packing, "epochs_cap": 3}})
    t_load = time.perf_counter()
    model, tokenizer = load_model(a.model, device="cuda")
    train_rows = [e for e in load_gsm8k(Path(a.data) / "train.jsonl") if e.program]
    examples, _ = trace_examples(cfg, train_rows, tokenizer)
    dataset = build_dataset(cfg, examples, tokenizer)
    model = prepare_model(cfg, model)
    load_seconds = time.perf_counter() - t_load
    print(f"{len(dataset)} rows, {precision_kwargs()}, loaded in {load_seconds:.0f}s", flush=True)

    class TimeLimit(TrainerCallback):
        def __init__(self):
            self.t0 = None

        def on_step_end(self, args, state, control, **kwargs):
            self.t0 = self.t0 or time.perf_counter()
            if state.global_step % 20 == 0:
                print(f"step {state.global_step}/{state.max_steps} {time.perf_counter() - self.t0:.0f}s", flush=True)
            if time.perf_counter() - self.t0 > a.time_limit:
                control.should_training_stop = True

    torch.cuda.reset_peak_memory_stats()
    ckpt = Path(tempfile.mkdtemp(prefix="gpu-sft-"))  # not under --out: only the adapter and metrics come back
    run = run_sft(cfg, model, tokenizer, dataset, ckpt, callbacks=[TimeLimit()])

    test_rows = [e for e in load_gsm8k(Path(a.data) / "test.jsonl") if e.program][: a.heldout]
    held, _ = trace_examples(cfg, test_rows, tokenizer)
    rows = [{k: v for k, v in tokenize_example(tokenizer, ex).items() if k != "prompt_len"} for ex in held]
    collate = WeightedCollator(pad_token_id=tokenizer.pad_token_id)
    trained = run.model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(0, len(rows), 64):
            batch = {k: v.to("cuda") for k, v in collate(rows[i:i + 64]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(trained(**batch, use_cache=False).loss) * n
            count += n
    metrics = {
        "gpu": torch.cuda.get_device_name(0), "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "rows": len(dataset), "steps": run.steps, "batch_size": a.batch, "packing": not a.no_packing,
        "train_seconds": round(run.train_seconds, 1), "tokens_per_second": round(run.tokens_per_second, 1),
        "final_loss": run.final_loss, "heldout_loss": round(total / max(count, 1), 4), "heldout_rows": len(rows),
        "load_seconds": round(load_seconds, 1), "precision": precision_kwargs(), "loss_history": run.history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    trained.to(torch.bfloat16).save_pretrained(out / "adapter")  # bf16 keeps each file under the 16 MiB return limit
    print(json.dumps({k: v for k, v in metrics.items() if k != "loss_history"}, indent=2))


if __name__ == "__main__":
    main()
