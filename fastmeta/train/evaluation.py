"""Meta-testing: a model's score over tasks with its 95% confidence interval, a checkpoint's test, and a finished
run's summary beside its dataset's baseline on the same tasks."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from fastmeta.algorithms import LEARNERS, task_losses
from fastmeta.train.build import build_model, datasets, to_device
from fastmeta.train.checkpoint import load_checkpoint, load_states
from fastmeta.train.config import RunConfig

__all__ = ["evaluate_model", "evaluate", "summarize_run"]


def evaluate_model(
    model: nn.Module,
    aux: nn.Module | None,
    config: RunConfig,
    episodes: torch.utils.data.Dataset,
    batches: int,
    inner_steps: int,
    tasks: int | None = None,
    per_task: bool = False,
) -> dict:
    """Mean query accuracy (classification) or MSE (regression) after adapting to each task's support set,
    with its 95% confidence interval over the tasks: {"metric", "mean", "ci95", "tasks"}. tasks: count only
    the first this many of the batches' tasks (default all). per_task: also "values", each task's (T,)."""
    values = []
    device = next(model.parameters()).device
    was_training = model.training
    for i in range(batches):
        b = to_device(episodes[i], device)
        pred = config.learner.predict(config, model, aux, b, inner_steps)
        if config.metric == "mse":
            values.append(task_losses(config.loss_fn, pred, b.query_y))
        else:
            values.append((pred.argmax(-1) == b.query_y).float().mean(1))
    model.train(was_training)
    v = torch.cat(values).double()[:tasks]
    ci = 1.96 * v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    result = {"metric": config.metric, "mean": v.mean().item(), "ci95": ci, "tasks": len(v)}
    return {**result, "values": v} if per_task else result


def evaluate(
    checkpoint: str | os.PathLike,
    episodes: int = 1000,
    part: str = "test",
    inner_steps: int | None = None,
    data: str | None = None,
    tasks_per_batch: int = 50,
    device: str | torch.device = "cpu",
    n_way: int | None = None,
    k_shot: int | None = None,
    seed: int | None = None,
    per_task: bool = False,
) -> dict:
    """Meta-tests a checkpoint: `episodes` tasks of `part`, each adapted with `inner_steps` (default: the
    run's eval_inner_steps) steps. n_way, k_shot: test episodes other than the run's own (n_way for the metric
    learners, whose embeddings serve any number of classes; k_shot for all but SNAIL, whose sequence length is
    fixed). seed: that of the episodes (default the run's; another run's seed tests on that run's tasks).
    Returns {"metric", "mean", "ci95", "tasks", "config"} (config: the tested episodes' settings), and with
    per_task "values", each task's score."""
    if episodes < 1 or tasks_per_batch < 1:
        raise ValueError(f"episodes and tasks_per_batch must be >= 1, got {episodes} and {tasks_per_batch}")
    state = load_checkpoint(checkpoint)
    config = RunConfig.from_dict(state["config"])
    learner = config.learner
    if data is not None:
        config.data = data
    if n_way is not None and "n_way" not in config.spec.reads:
        raise ValueError(f"n_way: {config.dataset} tasks have no classes")
    built_for = dict(learner.built_for)
    if learner.head:
        headless = ", ".join(n for n, x in LEARNERS.items() if not x.head and "n_way" not in x.built_for)
        built_for["n_way"] = f"its head has n_way outputs (the learners that test on any number: {headless})"
    for name, value in (("n_way", n_way), ("k_shot", k_shot)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        if value is not None and value != getattr(config, name) and name in built_for:
            raise ValueError(
                f"{name}: a {config.algo} model is built for {getattr(config, name)}-{name.split('_')[1]} "
                f"episodes; {built_for[name]}"
            )
    saved = state.get("model_config") or config.model_config()
    if saved.get("model") != config.model_config()["model"]:  # e.g. an MLP's weights under a Conv4 run's config
        raise ValueError(
            f"{checkpoint} holds a different model ({saved}) than its run's settings build ({config.model_config()})"
        )
    model, aux = build_model(config, device, saved)  # the checkpoint's own (e.g. runs before --hidden)
    load_states(state, model, aux, None, Path(checkpoint))
    tested = {"n_way": n_way or config.n_way, "k_shot": k_shot or config.k_shot}
    tasks_per_batch = min(tasks_per_batch, episodes)
    # the tested episodes, whatever the part: not the wider training episodes of --train-way or --train-shot
    wider = {k: None for k in ("train_way", "train_shot") if k in config.options}
    eval_config = replace(
        config, **tested, meta_batch=tasks_per_batch, augment=False, options={**config.options, **wider}
    )
    if seed is not None:
        eval_config = replace(eval_config, seed=seed)
    batches = math.ceil(episodes / tasks_per_batch)
    steps = config.get("eval_inner_steps", 0) if inner_steps is None else inner_steps
    episodes_of = datasets(eval_config, part)
    result = evaluate_model(model, aux, eval_config, episodes_of, batches, steps, episodes, per_task)
    result["config"] = {**asdict(config), **tested}
    result["inner_steps"] = steps if learner.adapts else None  # the metric learners and SNAIL do not adapt
    return result


def summarize_run(
    out: str | os.PathLike, config: RunConfig, episodes: int = 1000, device: str | torch.device = "cpu"
) -> dict | None:
    """What a finished run needs to be judged: out/best.pt on `episodes` test tasks and, where the dataset
    has a baseline learner (its DatasetSpec.baseline) and a run of it sits beside `out` (its best.pt, the same
    dataset and episode sizes), that baseline on the same tasks with the paired difference. Returns None
    without a best.pt, else {"test": evaluate's result, "baseline": learner name or None, "baseline_run":
    {"path", "mean", "ci95", "difference", "difference_ci95"} or None}."""
    best = Path(out) / "best.pt"
    if episodes < 1 or not best.is_file():
        return None
    test = evaluate(best, episodes, device=device, per_task=True)
    found = None
    baseline = config.spec.baseline
    if baseline is not None and baseline != config.algo:
        found = _baseline_run(Path(out), config, baseline, test, episodes, device)
    del test["values"]
    return {"test": test, "baseline": baseline if baseline != config.algo else None, "baseline_run": found}


def _baseline_run(out: Path, config: RunConfig, baseline: str, test: dict, episodes: int, device) -> dict | None:  # noqa: ANN001
    runs = sorted(out.parent.glob(f"{baseline}-{config.dataset}*/best.pt"), key=lambda p: p.stat().st_mtime)
    for path in reversed(runs):  # the latest that tests on the same tasks
        try:
            other = RunConfig.from_dict(load_checkpoint(path)["config"])
        except (ValueError, KeyError, TypeError):
            continue
        if (other.algo, other.dataset, other.n_query) != (baseline, config.dataset, config.n_query):
            continue
        theirs = evaluate(path, episodes, device=device, k_shot=config.k_shot, seed=config.seed, per_task=True)
        d = test["values"] - theirs["values"]
        ci = 1.96 * d.std().item() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        return {
            "path": str(path), "mean": theirs["mean"], "ci95": theirs["ci95"], "difference": d.mean().item(),
            "difference_ci95": ci,
        }  # fmt: skip
    return None
