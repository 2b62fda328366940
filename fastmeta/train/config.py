"""A run's configuration: every setting a meta-training run depends on (`RunConfig`, saved in each checkpoint
and compared on --resume), its defaults per dataset and learner, and its checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch.nn.functional as F

from fastmeta.algorithms import LEARNERS, Learner
from fastmeta.data.registry import DATASETS, DatasetSpec
from fastmeta.data.registry import dataset as _dataset
from fastmeta.models import BACKBONES

SCHEDULES = ("constant", "linear", "cosine")


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
        spec = _dataset(dataset)
        given = {k: v for k, v in overrides.items() if v is not None}
        learner = _learner(given.pop("algo", RunConfig.algo))  # the field's default
        options = {k: v for k, v in (given.pop("options", None) or {}).items() if v is not None}
        names = {f.name for f in fields(RunConfig)} - {"options"}
        options.update({k: given.pop(k) for k in list(given) if k not in names})
        for name in options:
            if learner.option(name) is None:
                raise ValueError(unread_option(learner, name))
        settings = {**spec.settings, **learner.defaults.get(spec.domain, {}), **given}
        options = {o.name: options.get(o.name, o.default_for(spec.domain)) for o in learner.options}
        config = RunConfig(algo=learner.name, dataset=dataset, **settings, options=options)
        config.check(given)
        return config

    @staticmethod
    def from_dict(saved: dict) -> RunConfig:
        """The RunConfig of a checkpoint's "config", also as written before the learners' declarations (the
        learner's options as fields and in `extra`)."""
        saved = dict(saved)
        learner = _learner(saved["algo"])
        domain = _dataset(saved["dataset"]).domain
        if "options" not in saved:
            extra = saved.pop("extra", None) or {}
            saved["layers"] = extra.get("layers", 2)
            old = {**{k: saved[k] for k in saved}, **extra}
            old.update({new: old[name] for name, new in learner.renamed.items() if name in old})
            saved["options"] = {
                o.name: old[o.name] if old.get(o.name) is not None else o.default_for(domain) for o in learner.options
            }
        saved["options"] = {  # options declared after the checkpoint was written: their defaults
            **{o.name: o.default_for(domain) for o in learner.options},
            **{learner.renamed.get(k, k): v for k, v in saved["options"].items()},
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
        learner, data = self.learner, _dataset(self.dataset)
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
        if self.options.get("inner_opt", "sgd") != "sgd" and str(self.options.get("recompute")).startswith("steps"):
            raise ValueError(
                f"recompute {self.options['recompute']} does not carry --inner-opt {self.options['inner_opt']}'s "
                "state yet: use --recompute K (K tasks at a time) or none"
            )

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
        return F.mse_loss if self.spec.kind == "regression" else F.cross_entropy

    @property
    def metric(self) -> str:
        return "mse" if self.spec.kind == "regression" else "accuracy"

    @property
    def spec(self) -> DatasetSpec:
        """The dataset's declaration (fastmeta.data.registry)."""
        return _dataset(self.dataset)

    def model_config(self) -> dict:
        """The from_config dict of the run's model: an MLP for regression, else the backbone for the dataset's
        images with an n_way head where the learner has one."""
        spec = self.spec
        if spec.kind == "regression":
            return {"model": "MLP", "sizes": [1, *[self.hidden] * self.layers, 1]}
        n_way = self.n_way if self.learner.head else None
        return BACKBONES[self.backbone].config(self.hidden, self.image_size, spec.channels, n_way)


def _learner(name: object) -> Learner:
    if name not in LEARNERS:
        raise ValueError(f"algo must be one of {tuple(LEARNERS)}, got {name!r}")
    return LEARNERS[name]


def _names(learner: Learner) -> str:
    return ", ".join(o.name for o in learner.options) or "none"


def unread_option(learner: Learner, name: str, flag: Callable[[str], str] = str) -> str:
    """The error for a setting `learner` does not read: which learners read it, and what this one reads."""
    readers = [n for n, x in LEARNERS.items() if x.option(name) is not None]
    if name in learner.renamed:
        new = learner.renamed[name]  # an earlier name of one of its options
        return f"{flag(name)} is not an option of {learner.name}: use {flag(new)}, {learner.option(new).help}"
    if not readers:
        return f"unknown setting {flag(name)}"
    reads = ", ".join(flag(o.name) for o in learner.options) or "no options of its own"
    who = learner.name
    return f"{flag(name)} is not an option of {who} (it is for {', '.join(readers)}); {who} reads {reads}"
