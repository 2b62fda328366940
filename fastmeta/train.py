"""Meta-training and meta-testing runs behind `python -m fastmeta train|eval`: data, model, optimiser,
periodic validation, atomic checkpoints that resume, and a learning curve."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import distributed
from fastmeta.algorithms import MetaSGDLR, adapt, maml_step, protonet_step, reptile_step, task_losses
from fastmeta.algorithms.matching import FullContextEmbedding, matching_step
from fastmeta.algorithms.meta_lstm import MetaLSTM, meta_lstm_step
from fastmeta.algorithms.protonet import ProtoOutput
from fastmeta.algorithms.siamese import siamese_step
from fastmeta.algorithms.snail import SNAIL, snail_step
from fastmeta.data import EpisodeSampler, SinusoidTasks, load_omniglot, omniglot_split
from fastmeta.models import from_config

ALGOS = ("maml", "fomaml", "metasgd", "reptile", "pretrain", "metalstm", "snail", "protonet", "matching", "siamese")
METRIC = ("protonet", "matching", "siamese")  # learners that classify by comparing embeddings: no head, no inner loop
EPISODIC = METRIC + ("snail",)  # read the support set itself: an embedding network, no inner steps
GRADIENT = ("maml", "fomaml", "metasgd", "reptile")  # adapt a network with a head by gradient steps
HEADED = GRADIENT + ("metalstm",)  # adapt a linear head: --zero-head applies
BACKBONES = ("conv4", "koch")
SCHEDULES = (None, "constant", "linear", "cosine")
DATASETS = ("sinusoid", "omniglot")

# Per dataset: what a run uses unless told otherwise (Finn et al. 2017's settings, fewer iterations).
DEFAULTS = {
    "sinusoid": dict(
        k_shot=10, n_query=10, meta_batch=25, inner_steps=1, eval_inner_steps=1, inner_lr=0.01, meta_lr=1e-3,
        iterations=20000, val_every=2000, val_episodes=40, hidden=40,
    ),
    "omniglot": dict(
        n_way=5, k_shot=1, n_query=5, meta_batch=32, inner_steps=1, eval_inner_steps=3, inner_lr=0.4, meta_lr=1e-3,
        iterations=20000, val_every=500, val_episodes=8,
    ),
}  # fmt: skip
# Per (dataset, algo), on top:
# - the Meta-LSTM reads T * P coordinates (P = 112k for a Conv4) through its LSTM at every update, so it takes fewer
#   tasks per step, and the paper's 5 updates; its inner_lr is the input gate's initial value (the learned rate),
#   0.011 as the paper's b_i in [-5, -4];
# - Reptile moves the weights by meta_lr (Nichol et al.'s outer step size epsilon, 1 annealed linearly to 0) times
#   theta - mean(adapted weights), and with one inner step it is joint training: Nichol et al.'s Omniglot settings
#   (5 tasks a step, 5 inner steps, 10-shot training episodes; SGD inner steps here, not their Adam; 10 test steps)
#   and, for sinusoids, their inner rate 0.02 (a 40-40 MLP: 1000 steps take the MSE after 10 test steps 4.0 -> 0.7).
ALGO_DEFAULTS = {
    ("omniglot", "metalstm"): dict(meta_batch=8, inner_steps=5, eval_inner_steps=5, inner_lr=0.011),
    ("omniglot", "reptile"): dict(
        meta_batch=5, inner_steps=5, eval_inner_steps=10, train_shot=10, inner_lr=0.1, meta_lr=1.0
    ),
    ("sinusoid", "reptile"): dict(inner_steps=5, inner_lr=0.02, meta_lr=1.0),
    ("sinusoid", "metalstm"): dict(inner_lr=0.011),
}


@dataclass
class RunConfig:
    """Everything a run depends on; saved in every checkpoint (a resumed run must use the same)."""

    algo: str = "maml"
    dataset: str = "sinusoid"
    data: str | None = None  # Omniglot folder or zips (see fastmeta.data.omniglot)
    split: str = "vinyals"
    n_way: int = 5
    train_way: int | None = None  # metric learners: classes per training episode (None: n_way)
    k_shot: int = 1
    train_shot: int | None = None  # support examples per class in training episodes (None: k_shot); val/test: k_shot
    n_query: int = 5
    meta_batch: int = 32
    inner_steps: int = 1
    eval_inner_steps: int = 3
    inner_lr: float = 0.4
    meta_lr: float = 1e-3
    schedule: str | None = None  # meta_lr over the iterations: constant, linear or cosine (to 0); None: per algo
    iterations: int = 20000
    val_every: int = 500
    val_episodes: int = 8  # validation batches of meta_batch tasks each
    seed: int = 0
    hidden: int = 64
    backbone: str = "conv4"  # conv4, or koch (Koch et al.'s Siamese network, for 105x105 images)
    image_size: int = 28
    extra: dict = field(default_factory=dict)

    @staticmethod
    def make(dataset: str = "sinusoid", **overrides: object) -> RunConfig:
        """The defaults of `dataset` with `overrides` (None values ignored)."""
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {**DEFAULTS[dataset], **ALGO_DEFAULTS.get((dataset, given.get("algo", "maml")), {}), **given}
        names = {f.name for f in fields(RunConfig)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        config = RunConfig(dataset=dataset, **values)
        config.check()
        return config

    def check(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.algo == "pretrain" and self.dataset != "sinusoid":
            raise ValueError("algo 'pretrain' (the joint-training baseline) is for the sinusoid dataset")
        if self.algo in EPISODIC and self.dataset == "sinusoid":
            raise ValueError(f"algo {self.algo!r} classifies: use --dataset omniglot")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "koch" and self.algo not in METRIC:
            raise ValueError(f"the koch backbone is an embedding network, for the metric learners {METRIC}")
        for key, algo in (("fce", "matching"), ("scale", "matching"), ("margin", "siamese"), ("pairs", "siamese")):
            if self.extra.get(key) is not None and self.algo != algo:
                raise ValueError(f"{key} is for {algo}, not {self.algo!r}")
        for key, valid, bound in (
            ("fce", lambda v: v >= 1, ">= 1"), ("scale", lambda v: v > 0, "> 0"), ("margin", lambda v: v > 0, "> 0")
        ):  # fmt: skip
            value = self.extra.get(key)
            if value is not None and not valid(value):
                raise ValueError(f"{key} must be {bound}, got {value}")
        layers = self.extra.get("layers")
        if layers is not None and (self.dataset != "sinusoid" or not isinstance(layers, int) or layers < 1):
            raise ValueError(
                f"layers is the sinusoid MLP's number of hidden layers, >= 1; got {layers!r} for {self.dataset}"
            )
        if self.extra.get("zero_head") and self.algo not in HEADED:
            raise ValueError(f"zero_head is for the learners that adapt a head, {HEADED}, not {self.algo!r}")
        if self.algo == "metalstm" and not 0 < self.inner_lr < 1:
            raise ValueError(f"inner_lr is the Meta-LSTM's first rate (its input gate), in (0, 1), got {self.inner_lr}")
        if self.extra.get("pairs") not in (None, "all_pairs", "pairs"):
            raise ValueError(f"pairs must be all_pairs or pairs, got {self.extra['pairs']!r}")
        if self.train_way is not None and self.algo not in METRIC:
            raise ValueError(
                f"train_way is for metric learners {METRIC}: the head of {self.algo!r} has n_way={self.n_way} outputs"
            )
        if self.train_shot is not None and self.algo == "snail":
            raise ValueError(
                "train_shot: SNAIL reads sequences of n_way * k_shot + 1 examples, so it trains on the k_shot it tests"
            )
        if self.train_shot is not None and self.train_shot < 1:
            raise ValueError(f"train_shot must be >= 1, got {self.train_shot}")
        for name in ("k_shot", "meta_batch", "iterations", "val_every", "val_episodes", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES[1:]}, got {self.schedule!r}")
        for name in ("inner_steps", "eval_inner_steps", "n_query"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def lr_at(self, it: int) -> float:
        """The meta learning rate of iteration `it`: Reptile's anneals linearly to 0 (Nichol et al.) unless a
        schedule says otherwise; the others' stay constant."""
        schedule = self.schedule or ("linear" if self.algo == "reptile" else "constant")
        done = it / self.iterations
        if schedule == "linear":
            return self.meta_lr * (1 - done)
        if schedule == "cosine":
            return self.meta_lr * 0.5 * (1 + math.cos(math.pi * done))
        return self.meta_lr

    @property
    def loss_fn(self) -> Callable:
        return F.mse_loss if self.dataset == "sinusoid" else F.cross_entropy

    def model_config(self) -> dict:
        if self.dataset == "sinusoid":
            return {"model": "MLP", "sizes": [1, *[self.hidden] * self.extra.get("layers", 2), 1]}
        if self.backbone == "koch":
            return {"model": "KochNet", "in_channels": 1, "image_size": self.image_size, "embedding_size": 4096}
        n_way = None if self.algo in EPISODIC else self.n_way  # an embedding network
        return {
            "model": "Conv4",
            "n_way": n_way,
            "in_channels": 1,
            "hidden": self.hidden,
            "image_size": self.image_size,
        }


def build_model(
    config: RunConfig, device: str | torch.device = "cpu", model_config: dict | None = None
) -> tuple[nn.Module, nn.Module | None]:
    """The run's model (on `device`; `model_config`: a checkpoint's, else the config's) and the other module it
    learns, if any: Meta-SGD's inner rates (MetaSGDLR) or the full-context embeddings of matching networks."""
    model = from_config(model_config or config.model_config())
    if config.algo == "metalstm":  # the learner inside its meta-learner: one module, one state dict
        model = MetaLSTM(model, hidden=20, init_lr=config.inner_lr)
    elif config.algo == "snail":
        model = SNAIL(config.n_way, config.k_shot, model, model.embedding_size)
    model = model.to(device)
    if config.extra.get("zero_head"):
        zero_head(model)
    aux: nn.Module | None = None
    if config.algo == "metasgd":
        aux = MetaSGDLR(model, init=config.inner_lr)
    elif config.algo == "matching" and config.extra.get("fce"):
        aux = FullContextEmbedding(model.embedding_size, steps=int(config.extra["fce"]))
    return model, aux if aux is None else aux.to(device)


def zero_head(model: nn.Module) -> None:
    """The zeroing trick (Kao et al. 2022, "MAML is a noisy contrastive learner in classification"): set the
    head's weight and bias to 0, as after every meta-update of a --zero-head run. Each task then adapts from a
    zero head: for cross-entropy its first inner step makes row c of the head inner_lr * (the mean support feature
    of class c minus 1/n_way times that of all classes), a prototype-like classifier, and the meta-gradient
    carries no noise from a random initial head. For a MetaLSTM, its learner's head (the head's part of the
    initial cell state theta_0)."""
    if isinstance(model, MetaLSTM):
        model = model.learner
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"zero_head: the model needs a linear `head`, {type(model).__name__} has none")
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()


def datasets(config: RunConfig, part: str = "train", shard: tuple[int, int] = (0, 1)) -> torch.utils.data.Dataset:
    """Episodes of one part: "train" (meta-training), "val" or "test" (a different seed for each part).
    shard: (rank, world_size), this process's tasks of each meta-batch."""
    seed = config.seed * 1000 + {"train": 0, "val": 1, "trainval": 0, "test": 2}[part]
    training = part in ("train", "trainval")  # the run's training episodes: --train-shot and --train-way apply
    k_shot = config.train_shot or config.k_shot if training else config.k_shot
    if config.dataset == "sinusoid":
        return SinusoidTasks(k_shot, config.n_query, config.meta_batch, seed=seed, shard=shard)
    n_way = config.train_way or config.n_way if training else config.n_way
    if config.data is None:
        raise FileNotFoundError(
            "omniglot needs --data PATH: a folder with omniglot-py/images_background/ and images_evaluation/ "
            "(torchvision's layout), or with images_background.zip and images_evaluation.zip"
        )
    images = omniglot_split(load_omniglot(config.data, config.image_size), config.split, part)
    try:
        return EpisodeSampler(images, n_way, k_shot, config.n_query, config.meta_batch, seed=seed, shard=shard)
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
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not a fastmeta checkpoint (no config and model state)")
    return state


def _step(
    config: RunConfig,
    model: nn.Module,
    aux: nn.Module | None,
    opt: torch.optim.Optimizer,
    batch,  # noqa: ANN001
    share: float = 1.0,
    stop: bool = False,
) -> dict:
    """One meta-step on this process's tasks; with several processes, the meta-gradient (and the logged loss
    and accuracy) are summed over them weighted by `share`, this process's fraction of the meta-batch, and
    `stop` is true on every process when it is on any."""
    opt.zero_grad(set_to_none=True)
    if config.algo == "reptile":  # writes the Reptile direction into .grad
        out = reptile_step(model, batch, config.inner_lr, config.inner_steps, config.loss_fn)
        loss = out.task_losses.mean()
    else:
        out = _objective(config, model, aux, batch)
        out.loss.backward()
        loss = out.loss.detach()
    acc = torch.nan if out.accuracy is None else out.accuracy.float().mean().item()
    stats = torch.tensor([loss.item() * share, acc * share, float(stop)], dtype=torch.float64)
    params = [p for group in opt.param_groups for p in group["params"]]
    stats = distributed.all_reduce_gradients(params, share, stats)
    if config.algo == "metalstm":
        torch.nn.utils.clip_grad_norm_(params, 0.25)  # Ravi & Larochelle clip the meta-gradient's norm to 0.25
    opt.step()
    if config.extra.get("zero_head"):
        zero_head(model)
    loss, acc, stop = stats.tolist()
    return {"loss": loss, "accuracy": None if math.isnan(acc) else acc, "stop": stop > 0}


def _objective(config: RunConfig, model: nn.Module, aux: nn.Module | None, batch):  # noqa: ANN001, ANN202
    """The meta-training objective of one batch (an output with .loss, .accuracy) for every algo but Reptile."""
    if config.algo in METRIC:
        return _metric_step(config, model, aux, batch, config.train_way or config.n_way)
    if config.algo == "snail":
        return snail_step(model, batch)
    if config.algo == "metalstm":
        return meta_lstm_step(model, batch, config.inner_steps, config.loss_fn)
    if config.algo == "pretrain":  # joint training on every point of every task, no adaptation
        x = torch.cat([batch.support_x, batch.query_x], 1)
        y = torch.cat([batch.support_y, batch.query_y], 1)
        return maml_step(
            model, type(batch)(batch.support_x, batch.support_y, x, y), config.inner_lr, 0, False, config.loss_fn
        )
    inner_lr = aux if config.algo == "metasgd" else config.inner_lr
    return maml_step(model, batch, inner_lr, config.inner_steps, config.algo == "fomaml", config.loss_fn)


def _metric_step(config: RunConfig, model: nn.Module, aux: nn.Module | None, batch, n_way: int) -> ProtoOutput:  # noqa: ANN001
    if config.algo == "protonet":
        return protonet_step(model, batch, n_way)
    if config.algo == "siamese":
        extra = config.extra
        return siamese_step(model, batch, extra.get("margin") or 1.0, extra.get("pairs") or "all_pairs", n_way)
    return matching_step(model, batch, n_way, fce=aux, scale=config.extra.get("scale") or 1.0)


def evaluate_model(
    model: nn.Module,
    aux: nn.Module | None,
    config: RunConfig,
    episodes: torch.utils.data.Dataset,
    batches: int,
    inner_steps: int,
    tasks: int | None = None,
) -> dict:
    """Mean query accuracy (classification) or MSE (regression) after adapting to each task's support set,
    with its 95% confidence interval over the tasks: {"metric", "mean", "ci95", "tasks"}. tasks: count only
    the first this many of the batches' tasks (default all)."""
    values = []
    device = next(model.parameters()).device
    was_training = model.training
    for i in range(batches):
        b = episodes[i].to(device)
        if config.algo in METRIC:
            with torch.no_grad():
                pred = _metric_step(config, model, aux, b, config.n_way).logits
        elif config.algo == "snail":
            with torch.no_grad():
                pred = model(b)
        elif config.algo == "metalstm":
            with torch.no_grad():  # the inner gradients are still taken; no graph is kept across the steps
                fast = model.adapt(b.support_x, b.support_y, inner_steps, config.loss_fn)[0]
                pred = model.predict(fast, b.query_x)
        else:
            inner_lr = aux if config.algo == "metasgd" else config.inner_lr
            pred = adapt(model, b.support_x, b.support_y, inner_lr, inner_steps, config.loss_fn)(b.query_x)
        if config.dataset == "sinusoid":
            values.append(task_losses(config.loss_fn, pred, b.query_y))
        else:
            values.append((pred.argmax(-1) == b.query_y).float().mean(1))
    model.train(was_training)
    v = torch.cat(values).double()[:tasks]
    ci = 1.96 * v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {
        "metric": "mse" if config.dataset == "sinusoid" else "accuracy",
        "mean": v.mean().item(),
        "ci95": ci,
        "tasks": len(v),
    }


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
    ckpt_path = out / "checkpoint.pt"
    out.mkdir(parents=True, exist_ok=True)
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, aux = build_model(config, device)
    share = len(distributed.shard_range(config.meta_batch, rank, size)) / config.meta_batch
    params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
    opt: torch.optim.Optimizer
    if config.algo == "reptile":
        opt = torch.optim.SGD(params, lr=config.meta_lr)
    else:
        opt = torch.optim.Adam(params, lr=config.meta_lr)
    start, history, best = 0, [], None
    if resume:
        state = load_checkpoint(ckpt_path)
        saved = RunConfig(**state["config"])
        if saved != config:
            diff = {k: (v, getattr(config, k)) for k, v in asdict(saved).items() if getattr(config, k) != v}
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
    while it < config.iterations:
        for group in opt.param_groups:
            group["lr"] = config.lr_at(it)
        late = lead and deadline is not None and time.time() > deadline
        info = _step(config, model, aux, opt, train_set[it].to(device), share, stop=late)
        timed_out = info.pop("stop")
        it += 1
        if not lead:
            if timed_out:
                break
            continue
        progress.update(info)
        if it % config.val_every == 0 or it == config.iterations or timed_out:
            v = evaluate_model(model, aux, config, val_set, config.val_episodes, config.eval_inner_steps)
            result = {"iteration": it, "seconds": time.time() - tic, "train_loss": info["loss"], "val": v["mean"]}
            result["val_ci95"] = v["ci95"]
            history.append(result)
            better = best is None or (v["mean"] < best if v["metric"] == "mse" else v["mean"] > best)
            best = v["mean"] if better else best
            progress.write(f"iteration {it}: validation {v['metric']} {v['mean']:.4f} +- {v['ci95']:.4f}")
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
) -> dict:
    """Meta-tests a checkpoint: `episodes` tasks of `part`, each adapted with `inner_steps` (default: the
    run's eval_inner_steps) steps. n_way, k_shot: test episodes other than the run's own (n_way for the metric
    learners, whose embeddings serve any number of classes; k_shot for all but SNAIL, whose sequence length is
    fixed). Returns {"metric", "mean", "ci95", "tasks", "config"} (config: the tested episodes' settings)."""
    if episodes < 1 or tasks_per_batch < 1:
        raise ValueError(f"episodes and tasks_per_batch must be >= 1, got {episodes} and {tasks_per_batch}")
    state = load_checkpoint(checkpoint)
    config = RunConfig(**state["config"])
    if data is not None:
        config.data = data
    if config.dataset == "sinusoid" and n_way is not None:
        raise ValueError("n_way: sinusoid tasks have no classes")
    for name, value in (("n_way", n_way), ("k_shot", k_shot)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        if value is None or value == getattr(config, name):
            continue
        if (name == "n_way" and config.algo not in METRIC) or config.algo == "snail":
            why = (
                f"only the metric learners {METRIC} test on other numbers of classes"
                if name == "n_way"
                else "its sequence of support pairs has a fixed length"
            )
            raise ValueError(
                f"{name}: a {config.algo} model is built for {getattr(config, name)}-{name.split('_')[1]} "
                f"episodes; {why}"
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
    eval_config = RunConfig(
        **{**asdict(config), **tested, "meta_batch": tasks_per_batch, "train_way": None, "train_shot": None}
    )
    batches = math.ceil(episodes / tasks_per_batch)
    steps = config.eval_inner_steps if inner_steps is None else inner_steps
    result = evaluate_model(model, aux, eval_config, datasets(eval_config, part), batches, steps, episodes)
    result["config"] = {**asdict(config), **tested}
    result["inner_steps"] = None if config.algo in EPISODIC else steps  # metric learners and SNAIL do not adapt
    return result


__all__ = ["RunConfig", "train", "evaluate", "save_checkpoint", "load_checkpoint", "plot_history"]
