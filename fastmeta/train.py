"""Meta-training and meta-testing runs behind `python -m fastmeta train|eval`: data, model, optimiser,
periodic validation, atomic checkpoints that resume, and a learning curve."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import distributed
from fastmeta.algorithms import LEARNERS, Learner, task_losses
from fastmeta.algorithms.common import zero_head
from fastmeta.data import FEWSHOT, EpisodeSampler, SinusoidTasks, load_fewshot, load_omniglot, omniglot_split
from fastmeta.models import from_config

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Backbone:
    """A network a learner's model is built on: its from_config entry for a run (n_way: the head's outputs, or
    None for an embedding network)."""

    model_config: Callable[[RunConfig, int | None], dict]
    embedding_only: bool = False  # no head: only for the learners that read embeddings


BACKBONES: dict[str, Backbone] = {
    "conv4": Backbone(
        lambda c, n_way: {
            "model": "Conv4", "n_way": n_way, "in_channels": DATASETS[c.dataset].channels, "hidden": c.hidden,
            "image_size": c.image_size,
        }
    ),
    "koch": Backbone(  # Koch et al.'s Siamese network, for 105x105 images
        lambda c, n_way: {
            "model": "KochNet", "in_channels": DATASETS[c.dataset].channels, "image_size": c.image_size,
            "embedding_size": 4096,
        },
        embedding_only=True,
    ),
    "resnet12": Backbone(  # MetaOptNet's ResNet-12, widths 64-160-320-640 (fastmeta.models.ResNet12)
        lambda c, n_way: {
            "model": "ResNet12", "n_way": n_way, "in_channels": DATASETS[c.dataset].channels,
            "image_size": c.image_size,
        }
    ),
}  # fmt: skip


def _sinusoid_episodes(config: RunConfig, part: str, n_way: int, k_shot: int, seed: int, shard: tuple[int, int]):  # noqa: ANN202
    return SinusoidTasks(k_shot, config.n_query, config.meta_batch, seed=seed, shard=shard)


def _omniglot_episodes(config: RunConfig, part: str, n_way: int, k_shot: int, seed: int, shard: tuple[int, int]):  # noqa: ANN202
    if config.data is None:
        raise FileNotFoundError(
            "omniglot needs --data PATH: a folder with omniglot-py/images_background/ and images_evaluation/ "
            "(torchvision's layout), or with images_background.zip and images_evaluation.zip"
        )
    images = omniglot_split(load_omniglot(config.data, config.image_size), config.split, part)
    return EpisodeSampler(images, n_way, k_shot, config.n_query, config.meta_batch, seed=seed, shard=shard)


def _fewshot_episodes(config: RunConfig, part: str, n_way: int, k_shot: int, seed: int, shard: tuple[int, int]):  # noqa: ANN202
    """The image datasets of fastmeta.data.fewshot: RGB episodes normalised by the train split's mean and std,
    augmented (--augment) only in the training parts."""
    info = FEWSHOT[config.dataset]
    if config.data is None:
        layouts = "; or ".join(layout.expects for layout in info.layouts)
        raise FileNotFoundError(f"{config.dataset} needs --data PATH: the folder with {layouts}")
    data = load_fewshot(config.dataset, config.data, config.image_size)
    augment = config.augment and part in ("train", "trainval")
    return data.episodes(part, n_way, k_shot, config.n_query, config.meta_batch, seed, augment=augment, shard=shard)


@dataclass(frozen=True)
class Dataset:
    """A dataset a run can use: its task kind ("regression": MSE, or "classification": accuracy), its default run
    settings (Finn et al.'s, fewer iterations), the run settings only it reads (an error elsewhere), its episodes
    and its model."""

    kind: str
    defaults: dict[str, object]
    reads: tuple[str, ...]
    episodes: Callable  # (config, part, n_way, k_shot, seed, shard) -> episodes indexed by step
    channels: int = 1
    baseline: str | None = None  # the learner a run's test is compared with, where a run of it is at hand

    def model_config(self, config: RunConfig, head: bool) -> dict:
        if self.kind == "regression":
            return {"model": "MLP", "sizes": [1, *[config.hidden] * config.layers, 1]}
        return BACKBONES[config.backbone].model_config(config, config.n_way if head else None)


DATASETS: dict[str, Dataset] = {
    "sinusoid": Dataset(
        "regression",
        dict(k_shot=10, n_query=10, meta_batch=25, meta_lr=1e-3, iterations=20000, val_every=2000, val_episodes=40,
             hidden=40),
        reads=("layers",),
        episodes=_sinusoid_episodes,
        baseline="pretrain",  # Finn et al.'s: joint training on all tasks, fine-tuned at test
    ),
    "omniglot": Dataset(
        "classification",
        dict(n_way=5, k_shot=1, n_query=5, meta_batch=32, meta_lr=1e-3, iterations=20000, val_every=500,
             val_episodes=8),
        reads=("data", "split", "n_way", "backbone", "image_size"),
        episodes=_omniglot_episodes,
    ),
    # mini-ImageNet, CIFAR-FS, FC100, CUB-200-2011, image folders: the standard 5-way episodes with 15 queries
    # a class; Finn et al.'s mini-ImageNet meta-batch of 4 and 60k iterations
    **{
        name: Dataset(
            "classification",
            dict(n_way=5, k_shot=1, n_query=15, meta_batch=4, meta_lr=1e-3, iterations=60000, val_every=1000,
                 val_episodes=25, image_size=info.image_size),
            reads=("data", "n_way", "backbone", "image_size", "augment"),
            episodes=_fewshot_episodes,
            channels=3,
        )
        for name, info in FEWSHOT.items()
    },
}  # fmt: skip


def _setting(default: object, help: str, kind: type | None = None, **more: object):  # noqa: A002, ANN202
    """A run setting: a field of RunConfig and an option of `fastmeta train` (kind: its type, default that of
    `default`; choices; minimum: for an int, default 1, None for none; positive: for a float, > 0)."""
    return field(default=default, metadata={"help": help, "type": kind or type(default), **more})


@dataclass
class RunConfig:
    """Everything a run depends on; saved in every checkpoint (a resumed run must use the same). The settings
    of every run are fields (defaults per dataset: DATASETS); the chosen learner's own are in `options`
    (declared by the learner, fastmeta.algorithms.LEARNERS) and read as attributes too (config.inner_lr)."""

    algo: str = _setting("maml", "the learner", choices=tuple(LEARNERS))
    dataset: str = _setting("sinusoid", "the tasks", choices=tuple(DATASETS))
    data: str | None = _setting(None, "where the dataset is (Omniglot: a torchvision-style folder or the folder "
                                "of the zips; the image datasets: see fastmeta.data.fewshot)", kind=str)  # fmt: skip
    split: str = _setting("vinyals", "Omniglot split", choices=("vinyals", "lake"))
    n_way: int = _setting(5, "classes per episode")
    k_shot: int = _setting(1, "support examples per class (sinusoid: points per task)")
    n_query: int = _setting(5, "query examples per class (sinusoid: points per task)", minimum=0)
    meta_batch: int = _setting(32, "tasks per meta-step")
    meta_lr: float = _setting(1e-3, "meta (outer) learning rate", positive=True)
    schedule: str | None = _setting(
        None, "meta learning rate over --iterations, to 0 (default: the learner's)", kind=str, choices=SCHEDULES
    )
    iterations: int = _setting(20000, "meta-steps")
    val_every: int = _setting(500, "meta-steps between validations (and checkpoints)")
    val_episodes: int = _setting(8, "validation batches of --meta-batch tasks each")
    seed: int = _setting(0, "seed of the model's initialisation and of the episodes", minimum=None)
    hidden: int = _setting(64, "width of the model's hidden layers (Conv4: channels)")
    layers: int = _setting(2, "hidden layers of the MLP, --hidden units each")
    backbone: str = _setting("conv4", "the network (koch: Koch et al.'s, for the learners without a head)",
                             choices=tuple(BACKBONES))  # fmt: skip
    image_size: int = _setting(28, "images resized to this")
    augment: bool = _setting(False, "training episodes' images randomly cropped (zero padding) and flipped")
    options: dict = field(default_factory=dict)

    @staticmethod
    def make(dataset: str = "sinusoid", **overrides: object) -> RunConfig:
        """The defaults of `dataset` and of the learner (`algo`, default maml) with `overrides` (None values
        ignored): run settings and the learner's options by name (or in `options`)."""
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {dataset!r}")
        given = {k: v for k, v in overrides.items() if v is not None}
        learner = _learner(given.pop("algo", RunConfig.algo))  # the field's default
        options = {k: v for k, v in (given.pop("options", None) or {}).items() if v is not None}
        names = {f.name for f in fields(RunConfig)} - {"options"}
        options.update({k: given.pop(k) for k in list(given) if k not in names})
        for name in options:
            if learner.option(name) is None:
                raise ValueError(unread_option(learner, name))
        settings = {**DATASETS[dataset].defaults, **learner.defaults.get(dataset, {}), **given}
        options = {o.name: options.get(o.name, o.default_for(dataset)) for o in learner.options}
        config = RunConfig(algo=learner.name, dataset=dataset, **settings, options=options)
        config.check(given)
        return config

    @staticmethod
    def from_dict(saved: dict) -> RunConfig:
        """The RunConfig of a checkpoint's "config", also as written before the learners' declarations (the
        learner's options as fields and in `extra`)."""
        saved = dict(saved)
        learner = _learner(saved["algo"])
        if "options" not in saved:
            extra = saved.pop("extra", None) or {}
            saved["layers"] = extra.get("layers", 2)
            old = {**{k: saved[k] for k in saved}, **extra}
            saved["options"] = {
                o.name: old[o.name] if old.get(o.name) is not None else o.default_for(saved["dataset"])
                for o in learner.options
            }
        saved["options"] = {  # options declared after the checkpoint was written: their defaults
            **{o.name: o.default_for(saved["dataset"]) for o in learner.options},
            **saved["options"],
        }
        names = {f.name for f in fields(RunConfig)}
        return RunConfig(**{k: v for k, v in saved.items() if k in names})

    def __getattr__(self, name: str) -> object:
        """The learner's options as attributes: config.inner_lr."""
        options = self.__dict__.get("options")
        if options is None or name.startswith("__"):
            raise AttributeError(name)
        if name in options:
            return options[name]
        raise AttributeError(f"{name!r}: {unread_option(_learner(self.algo), name)}")

    def get(self, name: str, default: object = None) -> object:
        """A learner option, or `default` where the learner does not read it."""
        return self.options.get(name, default)

    @property
    def learner(self) -> Learner:
        return _learner(self.algo)

    def check(self, given: dict | None = None) -> None:
        """Raises ValueError naming the setting unless the settings make a run. given: the settings the user
        set (an error for one that the dataset does not read)."""
        learner, data = self.learner, DATASETS.get(self.dataset)
        if data is None:
            raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {self.dataset!r}")
        if data.kind not in learner.tasks:
            which = [n for n, d in DATASETS.items() if d.kind in learner.tasks]
            raise ValueError(f"algo {self.algo!r} is for {' and '.join(learner.tasks)} tasks: use --dataset "
                             f"{' or '.join(which)}, not {self.dataset}")  # fmt: skip
        own = {r for d in DATASETS.values() for r in d.reads}
        for name in sorted(set(given or {}) & own - set(data.reads)):
            others = [n for n, d in DATASETS.items() if name in d.reads]
            raise ValueError(f"{name} is a setting of {' and '.join(others)} runs, not of {self.dataset} ones")
        for f in fields(self):
            if f.name == "options":
                continue
            value, meta = getattr(self, f.name), f.metadata
            if value is None and f.default is None:
                continue
            number = meta["type"] is float and isinstance(value, int)  # an int where a float goes is fine
            stray_bool = isinstance(value, bool) and meta["type"] is not bool  # isinstance(True, int) holds
            if stray_bool or not (isinstance(value, meta["type"]) or number):
                raise ValueError(f"{f.name} must be a {meta['type'].__name__}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
            if meta.get("choices") is not None and value not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
            low = meta.get("minimum", 1 if meta["type"] is int else None)
            if low is not None and value < low:
                raise ValueError(f"{f.name} must be >= {low}, got {value}")
            if meta.get("positive") and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")
        if BACKBONES[self.backbone].embedding_only and learner.head:
            headless = [n for n, x in LEARNERS.items() if not x.head]
            raise ValueError(
                f"the {self.backbone} backbone is an embedding network, for the learners without a head "
                f"({', '.join(headless)}), not {self.algo!r}"
            )
        if set(self.options) != {o.name for o in learner.options}:
            raise ValueError(f"options {sorted(self.options)} are not those {self.algo} reads: {_names(learner)}")
        for o in learner.options:
            o.check(self.options[o.name])

    def lr_at(self, it: int) -> float:
        """The meta learning rate of iteration `it`, per the schedule (default: the learner's; Reptile's anneals
        linearly to 0, as Nichol et al.; the others' stay constant)."""
        schedule = self.schedule or self.learner.schedule
        done = it / self.iterations
        if schedule == "linear":
            return self.meta_lr * (1 - done)
        if schedule == "cosine":
            return self.meta_lr * 0.5 * (1 + math.cos(math.pi * done))
        return self.meta_lr

    @property
    def loss_fn(self) -> Callable:
        return F.mse_loss if DATASETS[self.dataset].kind == "regression" else F.cross_entropy

    @property
    def metric(self) -> str:
        return "mse" if DATASETS[self.dataset].kind == "regression" else "accuracy"

    def model_config(self) -> dict:
        return DATASETS[self.dataset].model_config(self, self.learner.head)


def _learner(name: object) -> Learner:
    if name not in LEARNERS:
        raise ValueError(f"algo must be one of {tuple(LEARNERS)}, got {name!r}")
    return LEARNERS[name]


def _names(learner: Learner) -> str:
    return ", ".join(o.name for o in learner.options) or "none"


def unread_option(learner: Learner, name: str, flag: Callable[[str], str] = str) -> str:
    """The error for a setting `learner` does not read: which learners read it, and what this one reads."""
    readers = [n for n, x in LEARNERS.items() if x.option(name) is not None]
    if not readers:
        return f"unknown setting {flag(name)}"
    reads = ", ".join(flag(o.name) for o in learner.options) or "no options of its own"
    who = learner.name
    return f"{flag(name)} is not an option of {who} (it is for {', '.join(readers)}); {who} reads {reads}"


def build_model(
    config: RunConfig, device: str | torch.device = "cpu", model_config: dict | None = None
) -> tuple[nn.Module, nn.Module | None]:
    """The run's model (on `device`; `model_config`: a checkpoint's backbone, else the config's), as the learner
    builds it around its backbone, and the other module it learns, if any (its `aux`: Meta-SGD's inner rates,
    the full-context embeddings of matching networks)."""
    model, aux = config.learner.build(config, from_config(model_config or config.model_config()))
    return model.to(device), aux if aux is None else aux.to(device)


def datasets(config: RunConfig, part: str = "train", shard: tuple[int, int] = (0, 1)) -> torch.utils.data.Dataset:
    """Episodes of one part: "train" (meta-training), "val" or "test" (a different seed for each part).
    shard: (rank, world_size), this process's tasks of each meta-batch."""
    seed = config.seed * 1000 + {"train": 0, "val": 1, "trainval": 0, "test": 2}[part]
    training = part in ("train", "trainval")  # the run's training episodes: --train-shot and --train-way apply
    k_shot = config.get("train_shot") or config.k_shot if training else config.k_shot
    n_way = config.get("train_way") or config.n_way if training else config.n_way
    try:
        return DATASETS[config.dataset].episodes(config, part, n_way, k_shot, seed, shard)
    except ValueError as e:
        if k_shot == config.k_shot:
            raise
        raise ValueError(f"train_shot={k_shot} (the training episodes' k_shot): {e}") from None


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash mid-write
    leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, AttributeError, ImportError) as e:
        # torch.load's own words for a truncated zip ("Invalid argument") or a foreign pickle say nothing useful
        raise ValueError(
            f"{path} is not a readable fastmeta checkpoint ({type(e).__name__}: {e}): truncated, corrupt or not "
            "written by fastmeta train; a run folder's other checkpoint (checkpoint.pt or best.pt) may be intact"
        ) from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not a fastmeta checkpoint (no config and model state)")
    return state


class _StepNumbers:
    """A training step's logged loss and accuracy, on their way to the host, and whether the run stops.

    On a GPU they are copied without waiting and read() waits for that step alone: the loop reads a step's
    numbers after issuing the next one, so the host queues step k + 1 while the device still runs step k (a
    read right after each step would leave the device idle while the host issues the next)."""

    def __init__(self, values: torch.Tensor, stop: bool) -> None:
        self.stop, self.event = stop, None
        if values.is_cuda:
            self.values = values.to("cpu", non_blocking=True)  # into pinned memory, in order after the step
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values.cpu()

    def read(self) -> dict:
        if self.event is not None:
            self.event.synchronize()
        loss, acc = self.values.tolist()
        return {"loss": loss, "accuracy": None if math.isnan(acc) else acc}


def _step(
    config: RunConfig,
    model: nn.Module,
    aux: nn.Module | None,
    opt: torch.optim.Optimizer,
    batch,  # noqa: ANN001
    share: float = 1.0,
    stop: bool = False,
) -> _StepNumbers:
    """One meta-step on this process's tasks; with several processes, the meta-gradient (and the logged loss
    and accuracy) are summed over them weighted by `share`, this process's fraction of the meta-batch, and
    `stop` is true on every process when it is on any (agreed on at once, through the host: see
    distributed.any_rank)."""
    learner = config.learner
    opt.zero_grad(set_to_none=True)
    out = learner.objective(config, model, aux, batch)
    if learner.writes_gradient:  # the objective has put the meta-gradient into .grad (Reptile's direction)
        loss = out.task_losses.mean()
    else:
        out.loss.backward()
        loss = out.loss.detach()
    acc = loss.new_full((), math.nan) if out.accuracy is None else out.accuracy.float().mean()
    values = torch.stack([loss.detach().double(), acc.detach().double()])
    params = [p for group in opt.param_groups for p in group["params"]]
    values = distributed.all_reduce_gradients(params, share, values * share)  # (one process: as they are)
    stop = distributed.any_rank(stop)
    if learner.after_backward is not None:
        learner.after_backward(config, params)
    opt.step()
    if learner.after_step is not None:
        learner.after_step(config, model)
    return _StepNumbers(values, stop)


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
        b = _to_device(episodes[i], device)
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


def _to_device(batch, device: torch.device | str):  # noqa: ANN001, ANN202
    """The batch on `device`; to a GPU through pinned memory without waiting (a plain copy from pageable memory
    waits for everything queued on the device before it)."""
    if torch.device(device).type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


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
    lead = rank == 0
    if plot:
        _matplotlib()  # fail now, not after the first stretch of training
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"  # the folder is made at the first checkpoint: a run that fails before leaves none
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, aux = build_model(config, device)
    share = len(distributed.shard_range(config.meta_batch, rank, size)) / config.meta_batch
    params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
    optimizer = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[config.learner.optimizer]
    opt: torch.optim.Optimizer = optimizer(params, lr=config.meta_lr)
    start, history, best = 0, [], None
    if resume:
        state = load_checkpoint(ckpt_path)
        saved = RunConfig.from_dict(state["config"])
        # Options that change how the run computes, not what it trains, may change (e.g. --recompute after an
        # out-of-memory error); the checkpoints written from now on record the new value.
        free = {o.name for o in config.learner.options if o.same_result} if saved.algo == config.algo else set()
        changed = {
            n: (saved.options.get(n), config.options[n]) for n in free if saved.options.get(n) != config.options[n]
        }
        saved = replace(saved, options={**saved.options, **{n: config.options[n] for n in changed}})
        if changed and lead:
            print(f"--resume: {', '.join(f'{n} {a} -> {b}' for n, (a, b) in changed.items())}", flush=True)
        if saved != config:
            diff = {
                k: (v, getattr(config, k))
                for k, v in asdict(saved).items()
                if k != "options" and getattr(config, k) != v
            }
            names = dict.fromkeys([*saved.options, *config.options])
            diff.update({n: (saved.options.get(n), config.options.get(n)) for n in names
                         if saved.options.get(n) != config.options.get(n)})  # fmt: skip
            raise ValueError(
                f"--resume: {ckpt_path} was written by a run with other settings (saved, now): {diff}; "
                "resume with the same settings or write to another --out"
            )
        _load_states(state, model, aux, opt, ckpt_path)
        start, history, best = state["iteration"], state["history"], state.get("best")
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        saved_size = state.get("world_size", 1)
        if saved_size != size and lead:
            print(
                f"--resume: {ckpt_path} was written by a run on {saved_size} process(es), this one has {size}: the "
                f"meta-batch of {config.meta_batch} tasks is now split {size} ways, and task j of step i is the same "
                "whichever process draws it, so training goes on with the same tasks and, up to float rounding, "
                "the same meta-gradients",
                flush=True,
            )
    for module in (model, aux):
        if module is not None:
            distributed.broadcast_parameters(module)  # every process starts from rank 0's weights
    train_set = datasets(config, "train", shard=(rank, size))
    val_set = datasets(config, "val") if lead else None
    deadline = None if time_limit is None else time.time() + 60 * time_limit
    progress = _Progress(start, config.iterations) if lead else None
    result: dict = history[-1] if history else {}

    def checkpoint(it: int) -> None:
        state = {
            "config": asdict(config),
            "model_config": config.model_config(),
            "model": model.state_dict(),
            "aux": aux.state_dict() if aux is not None else None,
            "optimizer": opt.state_dict(),
            "iteration": it,
            "history": history,
            "best": best,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "world_size": size,
            "fastmeta": fastmeta.__version__,
        }
        save_checkpoint(ckpt_path, state)
        if history and best is not None and history[-1]["val"] == best:
            save_checkpoint(out / "best.pt", state)

    tic = time.time()
    it = start
    unread: tuple[int, _StepNumbers] | None = None  # the last step, if its numbers are not read yet
    while it < config.iterations:
        for group in opt.param_groups:
            group["lr"] = config.lr_at(it)
        late = lead and deadline is not None and time.time() > deadline
        numbers = _step(config, model, aux, opt, _to_device(train_set[it], device), share, stop=late)
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
                raise Diverged(_diverged(config, i, "training loss", info["loss"], ckpt_path, history))
            if progress is not None:
                progress.update(info)
        if not lead:
            if timed_out:
                break
            continue
        if validate:
            v = evaluate_model(model, aux, config, val_set, config.val_episodes, config.get("eval_inner_steps", 0))
            result = {"iteration": it, "seconds": time.time() - tic, "train_loss": info["loss"], "val": v["mean"]}
            result["val_ci95"] = v["ci95"]
            if not math.isfinite(v["mean"]):
                progress.close()
                raise Diverged(_diverged(config, it, f"validation {v['metric']}", v["mean"], ckpt_path, history))
            history.append(result)
            better = best is None or (v["mean"] < best if v["metric"] == "mse" else v["mean"] > best)
            best = v["mean"] if better else best
            progress.write(f"iteration {it}: validation {v['metric']} {v['mean']:.4f} +- {v['ci95']:.4f}")
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "history.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            checkpoint(it)
            if plot:
                plot_history(history, out / "curve.png", v["metric"])
        if timed_out:
            progress.write(f"time limit of {time_limit} min reached at iteration {it}: saved {ckpt_path}")
            break
    if progress is not None:
        progress.close()
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
    if "inner_lr" in config.options:
        rates.append(f"--inner-lr (now {config.inner_lr:g})")
    return (
        f"the {what} became {value} at iteration {it} of {config.iterations}; stopped: {kept}. Try a smaller "
        f"{' or '.join(rates)} in a new run, or --schedule cosine"
    )


def _load_states(state: dict, model: nn.Module, aux: nn.Module | None, opt, path: Path) -> None:  # noqa: ANN001
    try:
        model.load_state_dict(state["model"])
        if aux is not None:
            aux.load_state_dict(state["aux"] if "aux" in state else state["inner_lr"])
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{path} holds a different model ({state.get('model_config')}) than this run builds: {e}"
        ) from None
    if opt is not None:
        opt.load_state_dict(state["optimizer"])


def plot_history(history: list[dict], path: str | os.PathLike, metric: str) -> None:
    """The validation metric against iterations, as a PNG (needs matplotlib)."""
    plt = _matplotlib()
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


def _matplotlib():  # noqa: ANN202
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or fastmeta[train])") from None
    return plt


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
    if n_way is not None and "n_way" not in DATASETS[config.dataset].reads:
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
    _load_states(state, model, aux, None, Path(checkpoint))
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
    has a baseline learner (DATASETS[...].baseline) and a run of it sits beside `out` (its best.pt, the same
    dataset and episode sizes), that baseline on the same tasks with the paired difference. Returns None
    without a best.pt, else {"test": evaluate's result, "baseline": learner name or None, "baseline_run":
    {"path", "mean", "ci95", "difference", "difference_ci95"} or None}."""
    best = Path(out) / "best.pt"
    if episodes < 1 or not best.is_file():
        return None
    test = evaluate(best, episodes, device=device, per_task=True)
    found = None
    baseline = DATASETS[config.dataset].baseline
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


__all__ = [
    "RunConfig", "train", "evaluate", "summarize_run", "save_checkpoint", "load_checkpoint", "plot_history",
    "zero_head", "DATASETS", "BACKBONES",
]  # fmt: skip
