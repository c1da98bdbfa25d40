"""Training-loss plot (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: list[dict], out: Path, title: str = "student training loss") -> Path | None:
    """Loss per step (SFT and, when present, the contrastive stage) to `out`; None when there is nothing to plot."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    stages = sorted({h.get("stage", "sft") for h in history}, key=lambda s: s != "sft")
    for stage in stages:
        points = [h for h in history if h.get("stage", "sft") == stage]
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=stage, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(stages) > 1:
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
