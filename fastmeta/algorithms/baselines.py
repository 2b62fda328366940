"""The pretrained baselines: Baseline and Baseline++ (Chen et al. 2019, "A Closer Look at Few-shot
Classification") and Meta-Baseline (Chen et al. 2021).

- Baseline / Baseline++: the backbone and a head over all C training classes are trained with cross-entropy on
  ordinary mini-batches (not episodes); at test the backbone is frozen and each task fits a new head on its
  support embeddings: a linear head (Baseline) or a cosine-similarity head (Baseline++, Chen et al.'s
  distLinear). `fit_heads` fits every task's head at once: (T, n_way, D) weights, one batched matmul a step.
- Meta-Baseline: from a pretrained backbone (`--init` a Baseline run), episodic training of a cosine
  nearest-centroid classifier with a learned temperature; the same classifier at test.

At test the backbones embed in eval mode (their running batch-norm statistics, as in both papers' code).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms.common import (
    EVAL_INNER_STEPS,
    TRAIN_SHOT,
    TRAIN_WAY,
    ClassificationOutput,
    Learner,
    Option,
    Settings,
    classification_output,
)
from fastmeta.algorithms.protonet import check_episodes, class_prototypes
from fastmeta.data import LabeledBatch, TaskBatch

__all__ = [
    "CosineLinear",
    "Pretrained",
    "CentroidClassifier",
    "cosine_logits",
    "fit_heads",
    "head_logits",
    "BASELINE",
    "BASELINEPP",
    "METABASELINE",
]

HEADS = ("linear", "cosine")


def cosine_logits(x: Tensor, weight: Tensor, norm: Tensor, scale: float | Tensor) -> Tensor:
    """scale * norm_c * cos(x_i, weight_c): x (..., N, D), weight (..., C, D), norm (..., C) -> (..., N, C)
    (Chen et al.'s distLinear: x / (|x| + 1e-5) against weight-normalised rows with a learned norm each)."""
    xn = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    wn = weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return scale * (xn @ wn.transpose(-1, -2)) * norm.unsqueeze(-2)


class CosineLinear(nn.Module):
    """Baseline++'s head: (N, D) -> (N, C) logits scale * g_c * cos(x, v_c), v and g learned (weight norm)."""

    def __init__(self, features: int, classes: int, scale: float = 2.0) -> None:
        super().__init__()
        linear = nn.Linear(features, classes, bias=False)
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.norm = nn.Parameter(self.weight.detach().norm(dim=1))  # weight norm's g starts at |v|
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return cosine_logits(x, self.weight, self.norm, self.scale)


class Pretrained(nn.Module):
    """A backbone `body` (an embedding network: (N, *x) -> (N, D)) and a `head` over all the training classes."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1))


class CentroidClassifier(nn.Module):
    """Meta-Baseline's classifier: a backbone `body` and a learned temperature (the scale of its cosine
    logits against each task's class centroids)."""

    def __init__(self, body: nn.Module, temperature: float = 10.0) -> None:
        super().__init__()
        self.body = body
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).flatten(1)


def _embed(body: nn.Module, batch: TaskBatch, train: bool) -> tuple[Tensor, Tensor]:
    """(support (T, Ns, D), query (T, Nq, D)): every image of every task in one forward of `body`, in training
    mode (batch statistics over the whole batch, as Meta-Baseline's code) or in eval mode (running statistics)."""
    T, Ns = batch.support_x.shape[:2]
    x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    was = body.training
    body.train(train)
    try:
        z = body(x).flatten(1)
    finally:
        body.train(was)
    return z[: T * Ns].view(T, Ns, -1), z[T * Ns :].view(T, -1, z.shape[-1])


def _draws(T: int, n_way: int, D: int, Ns: int, epochs: int, kind: str, seed: int, like: Tensor):  # noqa: ANN202
    """The random draws of `fit_heads`: the heads' initial parameters (nn.Linear's initialisation, per task)
    and each epoch's order of each task's support examples (epochs, T, Ns)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(D) if D else 0.0
    weight = (torch.rand(T, n_way, D, generator=g, dtype=torch.float64) * 2 - 1) * bound
    second = (torch.rand(T, n_way, generator=g, dtype=torch.float64) * 2 - 1) * bound
    orders = torch.rand(epochs, T, Ns, generator=g).argsort(-1)
    if kind == "cosine":
        second = weight.norm(dim=-1)
    cast = dict(dtype=like.dtype, device=like.device)
    return weight.to(**cast), second.to(**cast), orders.to(like.device)


def head_logits(z: Tensor, head: tuple[Tensor, Tensor], kind: str = "linear", scale: float = 2.0) -> Tensor:
    """Each task's logits from its fitted head: z (T, N, D), head (weight (T, C, D), bias or norm (T, C)) ->
    (T, N, C); kind "linear" (z W^T + b) or "cosine" (cosine_logits with `scale`)."""
    weight, second = head
    if kind == "linear":
        return torch.baddbmm(second.unsqueeze(1), z, weight.transpose(1, 2))
    return cosine_logits(z, weight, second, scale)


def fit_heads(
    support: Tensor,
    labels: Tensor,
    n_way: int,
    kind: str = "linear",
    epochs: int = 100,
    lr: float = 0.01,
    *,
    batch_size: int = 4,
    momentum: float = 0.9,
    dampening: float = 0.9,
    weight_decay: float = 1e-3,
    scale: float = 2.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Fits a new head on each task's support embeddings, every task at once, as Chen et al. fit one per task:
    `epochs` passes over the support set in a random order, mini-batches of `batch_size`, cross-entropy,
    torch.optim.SGD(lr, momentum, dampening, weight_decay), from nn.Linear's initialisation (draws seeded by
    `seed`: the same heads every call).

    support (T, Ns, D) (detached: the backbone is frozen), labels (T, Ns) in [0, n_way). kind: "linear" or
    "cosine" (Baseline++: weight-normalised rows with a learned norm, logits scaled by `scale`). Returns the
    head (weight (T, n_way, D), bias or norm (T, n_way)) for `head_logits`."""
    if kind not in HEADS:
        raise ValueError(f"fit_heads: kind must be one of {HEADS}, got {kind!r}")
    if support.dim() != 3 or labels.shape != support.shape[:2] or labels.is_floating_point():
        raise ValueError(
            f"fit_heads: support must be (T, Ns, D) and labels (T, Ns) class indices, got {tuple(support.shape)} "
            f"and {labels.dtype} {tuple(labels.shape)}"
        )
    for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("n_way", n_way, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"fit_heads: {name} must be an integer >= {low}, got {value!r}")
    T, Ns, D = support.shape
    z, y = support.detach(), labels.long()
    weight, second, orders = _draws(T, n_way, D, Ns, epochs, kind, seed, z)
    params, buffers = [weight, second], [None, None]
    rows = torch.arange(T, device=z.device).unsqueeze(1)
    with torch.enable_grad():
        for epoch in range(epochs):
            for lo in range(0, Ns, batch_size):
                pick = orders[epoch, :, lo : lo + batch_size]  # (T, B)
                zb, yb = z[rows, pick], y[rows, pick]
                live = [p.detach().requires_grad_() for p in params]
                logits = head_logits(zb, (live[0], live[1]), kind, scale)
                loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(T, -1).mean(1)
                grads = torch.autograd.grad(loss.sum(), live)
                for i, (p, g) in enumerate(zip(params, grads)):  # torch.optim.SGD's step, each task its own
                    d = g + weight_decay * p if weight_decay else g
                    buffers[i] = (
                        d.clone() if buffers[i] is None else buffers[i].mul_(momentum).add_(d, alpha=1 - dampening)
                    )
                    params[i] = p - lr * buffers[i] if momentum else p - lr * d
    return params[0].detach(), params[1].detach()


# --- the learners ---------------------------------------------------------------------------------------------

BATCH_SIZE = Option(
    "batch_size", int, "images per pretraining mini-batch (Chen et al. 2019: 16)", default=16,
    valid=lambda v: v >= 1, bound=">= 1",
)  # fmt: skip
HEAD_LR = Option(
    "head_lr", float, "the learning rate of each test task's new head (SGD, momentum 0.9, as Chen et al.)",
    default=0.01, valid=lambda v: v > 0, bound="> 0",
)  # fmt: skip
HEAD_EPOCHS = EVAL_INNER_STEPS.but(
    help="epochs over each test task's support set fitting its new head (eval --inner-steps overrides)",
    default=100, per_domain={},
)  # fmt: skip
SCALE = Option(
    "cosine_scale", float, "Baseline++: the cosine head's scale (Chen et al.: 2 for up to 200 classes, 10 beyond)",
    default=2.0, per_domain={"characters": 10.0}, valid=lambda v: v > 0, bound="> 0",
)  # fmt: skip
INIT = Option(
    "init", str, "a checkpoint of a baseline or baselinepp run (its best.pt) whose backbone the run starts "
    "from ('': from scratch)", default="", metavar="PATH",
)  # fmt: skip
TEMPERATURE = Option(
    "temperature", float, "Meta-Baseline: the cosine logits' initial (learned) temperature", default=10.0,
    valid=lambda v: v > 0, bound="> 0",
)  # fmt: skip


def _features(config: Settings, backbone: nn.Module) -> int:
    """D, the size of the backbone's embedding of one image of the run's dataset."""
    x = torch.zeros(1, config.spec.channels, config.image_size, config.image_size)
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        D = backbone(x).flatten(1).shape[1]
    backbone.train(was)
    return D


def _build_pretrained(kind: str):  # noqa: ANN202
    def build(config: Settings, backbone: nn.Module) -> tuple[nn.Module, None]:
        classes = config.spec.class_batches(config, "train", 1).num_classes
        D = _features(config, backbone)
        head = nn.Linear(D, classes) if kind == "linear" else CosineLinear(D, classes, config.cosine_scale)
        return Pretrained(backbone, head), None

    return build


def _pretrain_objective(
    config: Settings, model: nn.Module, aux: nn.Module | None, batch: LabeledBatch
) -> ClassificationOutput:
    if not isinstance(batch, LabeledBatch):
        raise TypeError(f"--algo {config.algo} trains on LabeledBatch mini-batches, got {type(batch).__name__}")
    return classification_output(model(batch.x).unsqueeze(0), batch.y.unsqueeze(0))


def _predict_by_fitting(kind: str):  # noqa: ANN202
    def predict(config: Settings, model: nn.Module, aux: nn.Module | None, batch: TaskBatch, epochs: int) -> Tensor:
        n_way = check_episodes(batch, f"--algo {config.algo}", config.n_way)
        with torch.no_grad():
            support, query = _embed(model.body, batch, train=False)
        scale = config.get("cosine_scale", 2.0)
        head = fit_heads(support, batch.support_y, n_way, kind, epochs, config.head_lr, scale=scale)
        return head_logits(query, head, kind, scale)

    return predict


def centroid_logits(model: CentroidClassifier, batch: TaskBatch, n_way: int, train: bool) -> Tensor:
    """Meta-Baseline's query logits (T, Nq, n_way): temperature * cos(query, class centroid of the support)."""
    support, query = _embed(model.body, batch, train)
    centroids = class_prototypes(support, batch.support_y, n_way)
    return model.temperature * (F.normalize(query, dim=-1) @ F.normalize(centroids, dim=-1).transpose(1, 2))


def _metabaseline_objective(
    config: Settings, model: nn.Module, aux: nn.Module | None, batch: TaskBatch
) -> ClassificationOutput:
    n_way = check_episodes(batch, "--algo metabaseline", config.train_way or config.n_way)
    return classification_output(centroid_logits(model, batch, n_way, train=True), batch.query_y)


def _metabaseline_predict(
    config: Settings, model: nn.Module, aux: nn.Module | None, batch: TaskBatch, steps: int
) -> Tensor:
    with torch.no_grad():
        return centroid_logits(model, batch, check_episodes(batch, "--algo metabaseline", config.n_way), train=False)


def _load_backbone(config: Settings, model: nn.Module, aux: nn.Module | None) -> None:
    """--init PATH: the backbone ("body.*" weights) of a baseline run's checkpoint into `model.body`."""
    if not config.init:
        return
    path = Path(config.init)
    if not path.is_file():
        raise FileNotFoundError(f"--init: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        algo, weights = state["config"]["algo"], state["model"]
    except Exception as e:  # noqa: BLE001 (any unreadable file gets the same message)
        raise ValueError(f"--init: {path} is not a readable fastmeta checkpoint ({type(e).__name__}: {e})") from None
    body = {k[len("body.") :]: v for k, v in weights.items() if k.startswith("body.")}
    if not body:
        raise ValueError(f"--init: {path} (a {algo} run) has no backbone ('body.' weights): pass a baseline run's")
    try:
        model.body.load_state_dict(body)
    except RuntimeError as e:
        raise ValueError(
            f"--init: the backbone of {path} (a {algo} run) does not fit this run's (--backbone, --hidden and "
            f"--image-size must match): {str(e).splitlines()[0]}"
        ) from None


def _build_centroids(config: Settings, backbone: nn.Module) -> tuple[nn.Module, None]:
    return CentroidClassifier(backbone, config.temperature), None


def _pretrained_learner(name: str, summary: str, kind: str, options: tuple[Option, ...] = ()) -> Learner:
    """Baseline or Baseline++: pretrained on class mini-batches with a `kind` head, new `kind` heads at test."""
    return Learner(
        name=name,
        summary=summary,
        options=(BATCH_SIZE, HEAD_EPOCHS, HEAD_LR, *options),
        objective=_pretrain_objective,
        predict=_predict_by_fitting(kind),
        build=_build_pretrained(kind),
        head=False,
        tasks=("classification",),
        batches="classes",
    )


BASELINE = _pretrained_learner(
    "baseline",
    "Baseline (Chen et al. 2019): pretrained with cross-entropy on all training classes (mini-batches of "
    "--batch-size), a new linear head fitted on each test task's support set",
    "linear",
)
BASELINEPP = _pretrained_learner(
    "baselinepp",
    "Baseline++ (Chen et al. 2019): as baseline with cosine-similarity heads (--cosine-scale), pretrained and "
    "fitted at test",
    "cosine",
    (SCALE,),
)
METABASELINE = Learner(
    name="metabaseline",
    summary="Meta-Baseline (Chen et al. 2021): episodic training of a cosine nearest-centroid classifier with a "
    "learned temperature, from a pretrained backbone (--init a baseline run's best.pt)",
    options=(INIT, TEMPERATURE, TRAIN_WAY, TRAIN_SHOT),
    objective=_metabaseline_objective,
    predict=_metabaseline_predict,
    build=_build_centroids,
    head=False,
    tasks=("classification",),
    initialize=_load_backbone,
    defaults={"natural": {"meta_lr": 1e-4}, "characters": {"meta_lr": 1e-4}},
)
