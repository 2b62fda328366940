"""Learning curves: a run's validation score as a PNG (needs matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["plot_history"]


def plot_history(history: list[dict], path: str | os.PathLike, metric: str) -> None:
    """The validation metric against iterations, as a PNG (needs matplotlib)."""
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [h["iteration"] for h in history]
    ys = [h["val"] for h in history]
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def matplotlib_pyplot():  # noqa: ANN202
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or fastmeta[train])") from None
    return plt
