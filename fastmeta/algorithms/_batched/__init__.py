"""Run one model for T tasks at once, each task with its own (fast) weights or all sharing the initial ones.

Three runners share one call: `runner(params, x) -> y`, with x of shape (T, N, *in) and y of shape (T, N, *out).
Each entry of `params` (name -> tensor, as in model.named_parameters()) is either the shared S_i tensor or a
per-task (T, *S_i) one. Batch statistics (BatchNorm in training mode) are always per task, as in a per-task
loop, and running statistics are never updated.

- `TracedModel` (also named `BatchedModel`): any model torch.fx can trace. Its graph runs node by node for all
  tasks at once: Linear layers with per-task weights are one batched matmul; convolutions of small per-task
  sets are one grouped convolution over the tasks (layout (N, T*C, ...), with one batch or group norm over
  T*C channels), larger ones run per task on channels-last slices (on this CPU faster than one grouped
  convolution and than vmap); parameter-free layers and functions (activations, pooling, +, *, cat, flatten,
  mean, views) run once over all tasks; a ReLU or LeakyReLU followed by max-pooling is computed as pooling
  then the activation (the same function, on a quarter of the elements), and BatchNorm -> ReLU -> max-pool as
  one layer. Values in different layouts meet as per-task views. Anything else runs once per task inside the
  graph (the same function, so still exact). Exact to any order: nothing here relies on vmap's BatchNorm rule.
- `VmapModel`: torch.func.vmap over tasks of torch.func.functional_call (strategy="vmap", models without
  BatchNorm; "auto" for models that trace but hold a module with parameters and no batched form).
- `LoopModel`: functional_call once per task (strategy="loop"; "auto" for models that cannot be traced).

Where things live (each module's docstring says more):

    layout.py    activation layouts ((T, N, ...), T x (N, ...), Grouped (N, T*C, ...)), tasks_first, and the
                 layout settings GROUPED_ALWAYS, GROUPED_MAX_EXAMPLES, NCHW_MAX_PIXELS, NCHW_MIN_CHANNELS
    layers.py    modules with parameters (Linear, Conv, BatchNorm, LayerNorm, GroupNorm): LAYERS, register_layer
    calls.py     traced function and method calls: the tables of what runs once over all tasks, and how
    plan.py      torch.fx tracing and the plan (one step per node, fused chains), cached per model and mode
    runners.py   TracedModel, VmapModel, LoopModel and runner(model, strategy)

The layout settings are module attributes of layout.py, read at each call (set them there:
`monkeypatch.setattr(_batched.layout, "GROUPED_MAX_EXAMPLES", 0)`).
"""

from __future__ import annotations

from fastmeta.algorithms._batched import layout as layout  # its settings are patched there
from fastmeta.algorithms._batched.layers import LAYERS, register_layer
from fastmeta.algorithms._batched.layers import _Conv as _Conv  # tests patch _Conv.conv
from fastmeta.algorithms._batched.layout import Activation, Grouped, tasks_first
from fastmeta.algorithms._batched.runners import BatchedModel, LoopModel, TracedModel, VmapModel, runner

__all__ = [
    "LAYERS",
    "Activation",
    "BatchedModel",
    "Grouped",
    "LoopModel",
    "TracedModel",
    "VmapModel",
    "register_layer",
    "runner",
    "tasks_first",
]
