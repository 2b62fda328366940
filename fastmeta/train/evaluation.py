"""Meta-testing: a model's score over tasks with its 95% confidence interval, a checkpoint's test, and a finished
run's summary beside its dataset's baseline on the same tasks."""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from fastmeta.algorithms import LEARNERS, task_losses
from fastmeta.data import TaskBatch
from fastmeta.models import from_config
from fastmeta.train.build import build_model, datasets, to_device
from fastmeta.train.checkpoint import load_checkpoint, load_states
from fastmeta.train.config import RunConfig

__all__ = ["evaluate_model", "evaluate", "summarize_run", "tasks_at_once", "EVAL_MEMORY"]


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
    the first this many of the batches' tasks (default all). per_task: also "values", each task's (T,).

    Each batch's tasks are adapted and predicted `tasks_at_once` at a time (the same tasks and scores, in the
    memory that fits): a batch of 50 mini-ImageNet tasks, 5,000 84x84 images, is not one forward."""
    values = []
    device = next(model.parameters()).device
    was_training = model.training
    for i in range(batches):
        b = episodes[i]
        step = tasks_at_once(config, b, device)
        for lo in range(0, b.num_tasks, step):
            chunk = to_device(b if step >= b.num_tasks else b[lo : lo + step], device)
            pred = config.learner.predict(config, model, aux, chunk, inner_steps)
            if config.metric == "mse":
                values.append(task_losses(config.loss_fn, pred, chunk.query_y))
            else:
                values.append((pred.argmax(-1) == chunk.query_y).float().mean(1))
    model.train(was_training)
    v = torch.cat(values).double()[:tasks]
    ci = 1.96 * v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    result = {"metric": config.metric, "mean": v.mean().item(), "ci95": ci, "tasks": len(v)}
    return {**result, "values": v} if per_task else result


# Evaluation's memory for activations on the CPU: at most this, and at most a quarter of the memory available.
# On a GPU: half of the device's free memory.
EVAL_MEMORY = 1 << 30


def tasks_at_once(config: RunConfig, batch: TaskBatch, device: torch.device | str) -> int:
    """How many of `batch`'s tasks to adapt and predict at once on `device`: the activations of a task's images
    (support and query, twice for the support's backward, measured on the run's backbone) within the memory
    budget (EVAL_MEMORY on the CPU, half the free memory of a GPU); at least 1."""
    shape = tuple(batch.support_x.shape[2:])
    images = batch.support_x.shape[1] + batch.query_x.shape[1]
    per_task = 2 * images * _activation_bytes(json.dumps(config.model_config(), sort_keys=True), shape)
    device = torch.device(device)
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = min(EVAL_MEMORY, available // 4)
    return max(1, min(batch.num_tasks, budget // max(per_task, 1)))


@functools.lru_cache(maxsize=16)
def _activation_bytes(model_config: str, shape: tuple[int, ...]) -> int:
    """The bytes of every layer's output for one input of `shape` through the backbone `model_config` (a JSON
    from_config dict): what a forward keeps for backward, an upper bound of what one without a graph holds."""
    model = from_config(json.loads(model_config))
    total = 0

    def count(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros(2, *shape))  # two: batch statistics need more than one example
    finally:
        for h in handles:
            h.remove()
    return max(total // 2, 1)


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
    episodes_of = datasets(eval_config, part, episodes=True)
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
