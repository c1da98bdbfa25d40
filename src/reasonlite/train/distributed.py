"""Data-parallel training on N processes: `reasonlite train/run --nproc N`.

torchrun (`torch.distributed.run`, part of torch) starts N copies of this module's `main`; each builds the same
trainer and HF Trainer/accelerate see the torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK) and wrap the
model in DDP: gloo on CPU, NCCL on GPU. `train.batch_size` stays the per-process batch, so N processes with batch b
train on the global batch N*b, as one process with batch N*b would. Checkpoints are written by rank 0 and read by
every rank on `--resume` (the same `checkpoints/` folder as single-process training); metrics, the loss plot and the
exported student are written by rank 0 only (`is_main_process`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reasonlite.config import ReasonLiteConfig, StageView, load_config
from reasonlite.train.formats_data import TrainError

LAUNCH_CONFIG = "launch-config.yaml"  # the train stage's view of the config, handed to the workers


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def launch(cfg: ReasonLiteConfig | StageView, trace_dir: str | Path, out_dir: str | Path, nproc: int,
           resume: bool = False, fresh: bool = False, adapter_only: bool = False):
    """Run `train_student` on `nproc` local processes under torchrun (in this process when 1) and return rank 0's
    TrainResult."""
    from reasonlite.train import TrainResult, train_student

    cfg = cfg.stage_view("train")
    if nproc == 1:
        return train_student(cfg, trace_dir, out_dir, resume=resume, fresh=fresh, adapter_only=adapter_only)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / LAUNCH_CONFIG).write_text(cfg.dump())  # loads back with the same train hash
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "reasonlite.train.distributed", str(out / LAUNCH_CONFIG), str(trace_dir), str(out),
           *(["--resume"] if resume else []), *(["--fresh"] if fresh else []),
           *(["--adapter-only"] if adapter_only else [])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = subprocess.run(cmd, check=False, env=env).returncode
    if rc != 0:
        raise TrainError(f"training on {nproc} processes failed (exit {rc}); the workers' errors are printed above "
                         "(rerun with --nproc 1 to see one process's error alone)")
    metrics = json.loads((out / "metrics.json").read_text())
    return TrainResult(out / "model", metrics["steps"], metrics["total_train_seconds"], metrics["final_loss"], metrics)


def main(argv: list[str] | None = None) -> None:
    from reasonlite.train import train_student

    args = list(sys.argv[1:] if argv is None else argv)
    flags = {a for a in args if a.startswith("--")}
    cfg_path, trace_dir, out = (a for a in args if not a.startswith("--"))
    train_student(load_config(cfg_path), trace_dir, out, resume="--resume" in flags, fresh="--fresh" in flags,
                  adapter_only="--adapter-only" in flags)


if __name__ == "__main__":
    main()
