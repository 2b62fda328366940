"""The training loop behind `fastmeta train`: meta-steps, periodic validation, atomic checkpoints that resume
exactly, the history and learning curve, time limits, and stopping on a diverged loss."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

import fastmeta
from fastmeta import distributed
from fastmeta.train.build import build_model, datasets, to_device
from fastmeta.train.checkpoint import load_checkpoint, load_states, save_checkpoint
from fastmeta.train.config import RunConfig
from fastmeta.train.evaluation import evaluate_model
from fastmeta.train.plot import matplotlib_pyplot, plot_history
from fastmeta.train.prefetch import Prefetcher
from fastmeta.train.step import StepNumbers, train_step

__all__ = ["train", "Diverged"]


class _Progress:
    """tqdm where installed, else a line every few seconds."""

    def __init__(self, start: int, total: int) -> None:
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.i, self.total, self.last = start, total, 0.0

    def update(self, info: dict) -> None:
        self.i += 1
        text = " ".join(f"{k}={v:.4g}" for k, v in info.items() if isinstance(v, float))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif time.time() - self.last > 10 or self.i == self.total:
            self.last = time.time()
            print(f"[{self.i}/{self.total}] {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Run:
    """A run in progress: what its checkpoints hold, and where they go."""

    config: RunConfig
    out: Path
    model: nn.Module
    aux: nn.Module | None
    opt: torch.optim.Optimizer
    world_size: int
    start: int = 0
    history: list[dict] = field(default_factory=list)
    best: float | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self, it: int) -> None:
        """out/checkpoint.pt at iteration `it`, and out/best.pt when the last validation is the best."""
        state = {
            "config": asdict(self.config),
            "model_config": self.config.model_config(),
            "model": self.model.state_dict(),
            "aux": self.aux.state_dict() if self.aux is not None else None,
            "optimizer": self.opt.state_dict(),
            "iteration": it,
            "history": self.history,
            "best": self.best,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "world_size": self.world_size,
            "fastmeta": fastmeta.__version__,
        }
        save_checkpoint(self.checkpoint_path, state)
        if self.history and self.best is not None and self.history[-1]["val"] == self.best:
            save_checkpoint(self.out / "best.pt", state)


def train(
    config: RunConfig,
    out: str | os.PathLike,
    resume: bool = False,
    time_limit: float | None = None,
    plot: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Meta-trains per `config`, writing out/checkpoint.pt (latest, every validation), out/best.pt (best
    validation), out/history.jsonl and, with `plot`, out/curve.png. Returns the last validation result.

    resume: continue from out/checkpoint.pt (its config must equal `config`). time_limit: minutes, after which
    the run saves and stops. device: where the model and the episodes go (a run may resume on another).

    Under torch.distributed (torchrun; see fastmeta.distributed) each process meta-trains on its share of every
    meta-batch of `config.meta_batch` tasks and the meta-gradients are summed: the same tasks and, up to float
    rounding, the same run as one process. Only rank 0 prints, validates and writes files."""
    rank, size = distributed.world()
    if plot:
        matplotlib_pyplot()  # fail now, not after the first stretch of training
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"  # the folder is made at the first checkpoint: a run that fails before leaves none
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, aux = build_model(config, device)
    params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
    optimizer = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[config.learner.optimizer]
    run = _Run(config, out, model, aux, optimizer(params, lr=config.meta_lr), size)
    if resume:
        _resume(run, lead=rank == 0)
    elif config.learner.initialize is not None:
        config.learner.initialize(config, model, aux)
    for module in (model, aux):
        if module is not None:
            distributed.broadcast_parameters(module)  # every process starts from rank 0's weights
    return _loop(run, rank, device, time_limit, plot)


def _resume(run: _Run, lead: bool) -> None:
    """Loads run.checkpoint_path into `run` (weights, optimiser, history, RNG states), after checking that it was
    written with the same settings."""
    config, ckpt_path = run.config, run.checkpoint_path
    state = load_checkpoint(ckpt_path)
    saved = RunConfig.from_dict(state["config"])
    # Options that change how the run computes, not what it trains, may change (e.g. --recompute after an
    # out-of-memory error); the checkpoints written from now on record the new value.
    free = {o.name for o in config.learner.options if o.same_result} if saved.algo == config.algo else set()
    changed = {n: (saved.options.get(n), config.options[n]) for n in free if saved.options.get(n) != config.options[n]}
    saved = replace(saved, options={**saved.options, **{n: config.options[n] for n in changed}})
    if changed and lead:
        print(f"--resume: {', '.join(f'{n} {a} -> {b}' for n, (a, b) in changed.items())}", flush=True)
    if saved != config:
        diff = {
            k: (v, getattr(config, k)) for k, v in asdict(saved).items() if k != "options" and getattr(config, k) != v
        }
        names = dict.fromkeys([*saved.options, *config.options])
        diff.update({n: (saved.options.get(n), config.options.get(n)) for n in names
                     if saved.options.get(n) != config.options.get(n)})  # fmt: skip
        raise ValueError(
            f"--resume: {ckpt_path} was written by a run with other settings (saved, now): {diff}; "
            "resume with the same settings or write to another --out"
        )
    load_states(state, run.model, run.aux, run.opt, ckpt_path)
    run.start, run.history, run.best = state["iteration"], state["history"], state.get("best")
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    saved_size = state.get("world_size", 1)
    if saved_size != run.world_size and lead:
        print(
            f"--resume: {ckpt_path} was written by a run on {saved_size} process(es), this one has {run.world_size}: "
            f"the meta-batch of {config.meta_batch} tasks is now split {run.world_size} ways, and task j of step i is "
            "the same whichever process draws it, so training goes on with the same tasks and, up to float "
            "rounding, the same meta-gradients",
            flush=True,
        )


def _loop(run: _Run, rank: int, device: str | torch.device, time_limit: float | None, plot: bool) -> dict:
    """Meta-steps from run.start to config.iterations (or the time limit), validating and checkpointing every
    val_every steps on rank 0. Returns the last validation result."""
    config, size, lead = run.config, run.world_size, rank == 0
    train_set = datasets(config, "train", shard=(rank, size))
    # this process's fraction of each batch: of the meta-batch's tasks, or of a class batch's examples
    share = getattr(train_set, "share", len(distributed.shard_range(config.meta_batch, rank, size)) / config.meta_batch)
    val_set = datasets(config, "val") if lead else None
    deadline = None if time_limit is None else time.time() + 60 * time_limit
    progress = _Progress(run.start, config.iterations) if lead else None
    result: dict = run.history[-1] if run.history else {}
    # seconds in the history are the run's: a resumed run goes on from its checkpoint's (the work done after
    # that checkpoint and lost with the process is done again, and counted once)
    tic = time.time() - (run.history[-1].get("seconds", 0.0) if run.history else 0.0)
    it = run.start
    unread: tuple[int, StepNumbers] | None = None  # the last step, if its numbers are not read yet
    with Prefetcher(train_set, run.start, config.iterations) as episodes:
        while it < config.iterations:
            for group in run.opt.param_groups:
                group["lr"] = config.lr_at(it)
            late = lead and deadline is not None and time.time() > deadline
            batch = to_device(episodes.get(it), device)
            numbers = train_step(config, run.model, run.aux, run.opt, batch, share, stop=late)
            timed_out = numbers.stop
            it += 1
            validate = it % config.val_every == 0 or it == config.iterations or timed_out
            # The last step's numbers are read now, as this step runs; this step's when the run validates or stops.
            due, unread = [unread] if unread else [], (it, numbers)
            if validate:
                due, unread = [*due, unread], None
            for i, n in due:
                info = n.read()
                if not math.isfinite(info["loss"]):  # the loss is summed over the processes: every one stops here
                    if progress is not None:
                        progress.close()
                    raise Diverged(
                        _diverged(config, i, "training loss", info["loss"], run.checkpoint_path, run.history)
                    )
                if progress is not None:
                    progress.update(info)
            if not lead:
                if timed_out:
                    break
                continue
            if validate:
                waited = (run.history[-1].get("episode_wait", 0.0) if run.history else 0.0) + episodes.waited
                episodes.waited = 0.0
                result = _validate(run, it, time.time() - tic, info["loss"], waited, val_set, progress, plot)
            if timed_out:
                progress.write(f"time limit of {time_limit} min reached at iteration {it}: saved {run.checkpoint_path}")
                break
    if progress is not None:
        progress.close()
    return result


def _validate(
    run: _Run,
    it: int,
    seconds: float,
    train_loss: float,
    episode_wait: float,
    val_set: object,
    progress: _Progress,
    plot: bool,
) -> dict:
    """Validates at iteration `it`: appends the result to the history and history.jsonl, checkpoints and redraws
    the curve. Returns the result. seconds: the run's wall-clock so far; episode_wait: of those, the seconds the
    meta-steps waited for their episodes."""
    config = run.config
    v = evaluate_model(run.model, run.aux, config, val_set, config.val_episodes, config.get("eval_inner_steps", 0))
    result = {"iteration": it, "seconds": seconds, "train_loss": train_loss, "val": v["mean"]}
    result.update(val_ci95=v["ci95"], episode_wait=episode_wait)
    if not math.isfinite(v["mean"]):
        progress.close()
        raise Diverged(_diverged(config, it, f"validation {v['metric']}", v["mean"], run.checkpoint_path, run.history))
    run.history.append(result)
    better = run.best is None or (v["mean"] < run.best if v["metric"] == "mse" else v["mean"] > run.best)
    run.best = v["mean"] if better else run.best
    progress.write(f"iteration {it}: validation {v['metric']} {v['mean']:.4f} +- {v['ci95']:.4f}")
    run.out.mkdir(parents=True, exist_ok=True)
    with open(run.out / "history.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    run.save(it)
    if plot:
        plot_history(run.history, run.out / "curve.png", v["metric"])
    return result


class Diverged(ValueError):
    """The training loss (or validation score) became NaN or infinite: the run stopped without saving."""


def _diverged(config: RunConfig, it: int, what: str, value: float, ckpt_path: Path, history: list[dict]) -> str:
    kept = (
        f"{ckpt_path} (iteration {history[-1]['iteration']}) and best.pt are kept as they were"
        if history
        else "nothing was saved"
    )
    rates = [f"--meta-lr (now {config.meta_lr:g})"]
    for name in ("inner_lr", "init_lr"):
        if name in config.options:
            rates.append(f"--{name.replace('_', '-')} (now {config.options[name]:g})")
    return (
        f"the {what} became {value} at iteration {it} of {config.iterations}; stopped: {kept}. Try a smaller "
        f"{' or '.join(rates)} in a new run, or --schedule cosine"
    )
