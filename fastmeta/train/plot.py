"""Learning curves: a run's validation score as a PNG, and several runs' against wall-clock on one plot
(`python -m fastmeta plot RUN...`; needs matplotlib)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["plot_history", "plot_runs", "read_run"]


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


def read_run(run: str | os.PathLike) -> tuple[str, str, list[dict]]:
    """A run folder's label ("<folder>: <algo> <N>-way <K>-shot", from its checkpoint's settings where one is
    there), its validation metric ("accuracy", "mse" or "score" when no checkpoint says) and its validation
    history (history.jsonl: iteration, seconds, val, ...)."""
    run = Path(run)
    path = run / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run folder of fastmeta train: no {path}")
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not history:
        raise ValueError(f"{path} is empty: the run has not validated yet")
    label, metric = run.name, "score"
    for name in ("checkpoint.pt", "best.pt"):
        if (run / name).is_file():
            from fastmeta.data.registry import DATASETS
            from fastmeta.train.checkpoint import load_checkpoint

            c = load_checkpoint(run / name)["config"]
            spec = DATASETS.get(c.get("dataset"))
            classes = spec is not None and spec.kind == "classification"
            metric = "score" if spec is None else "accuracy" if classes else "mse"
            shots = f" {c['n_way']}-way {c['k_shot']}-shot" if classes else f" {c['k_shot']}-shot"
            label = f"{run.name}: {c['algo']}{shots}"
            break
    return label, metric, history


def plot_runs(runs: list[str | os.PathLike], path: str | os.PathLike, x: str = "seconds") -> list[dict]:
    """Draws each run's validation score against `x` ("seconds": wall-clock, drawn in minutes; or
    "iteration") on one plot, written to `path` (a PNG). Returns one summary per run: label, best validation
    score and the minutes and iteration where the run first reached it, last iteration and minutes."""
    if x not in ("seconds", "iteration"):
        raise ValueError(f"x: 'seconds' or 'iteration', got {x!r}")
    if not runs:
        raise ValueError("runs: give at least one run folder")
    read = [read_run(r) for r in runs]  # every folder checked before anything is drawn
    metrics = {m for _, m, _ in read}
    if len(metrics) > 1:
        raise ValueError(f"runs: their validation metrics differ ({', '.join(sorted(metrics))}): plot them apart")
    (metric,) = metrics
    plt = matplotlib_pyplot("python -m fastmeta plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    summaries = []
    for label, _, history in read:
        if x == "seconds" and any("seconds" not in h for h in history):
            raise ValueError(f"{label}: its history has no wall-clock (written before fastmeta recorded it)")
        xs = [h["seconds"] / 60 if x == "seconds" else h["iteration"] for h in history]
        ys = [100 * h["val"] if metric == "accuracy" else h["val"] for h in history]
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        sign = -1 if metric == "mse" else 1
        best = max(range(len(history)), key=lambda i: sign * history[i]["val"])
        summaries.append({
            "label": label, "metric": metric, "best_val": history[best]["val"],
            "best_iteration": history[best]["iteration"],
            "best_minutes": history[best].get("seconds", float("nan")) / 60,
            "iterations": history[-1]["iteration"], "minutes": history[-1].get("seconds", float("nan")) / 60,
        })  # fmt: skip
    ax.set_xlabel("wall-clock (minutes)" if x == "seconds" else "meta-iteration")
    ax.set_ylabel({"accuracy": "validation accuracy (%)", "mse": "validation MSE"}.get(metric, "validation score"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return summaries


def matplotlib_pyplot(what: str = "--plot"):  # noqa: ANN202
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(f"{what} needs matplotlib: pip install matplotlib (or fastmeta[train])") from None
    return plt
