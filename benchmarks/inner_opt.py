"""Second-order MAML with Adam or momentum SGD in the inner loop: fastmeta.maml_step(inner_opt=...) against a
per-task loop of fastmeta's own reference update and against the peers' differentiable optimisers.

    python benchmarks/inner_opt.py [--tasks 32] [--steps 5] [--rounds 3] [--threads 2] [--small]

Conv4 (64 channels) on Omniglot-shaped tasks (28x28, 5-way 1-shot, 15 queries a class, random images), second
order, forward and backward of one meta-step. Methods, each where installed (../shared/peers/install_peers.sh):
  fastmeta   maml_step(..., inner_opt=fastmeta.Adam() or fastmeta.SGD(momentum=0.9)), all tasks at once
  loop       per task: autograd.grad(create_graph=True) and fastmeta.reference.adam_update / sgd_update
  torchopt   torchopt.MetaAdam / MetaSGD(momentum=0.9) per task, extract/recover_state_dict (its MAML example)
  higher     higher.innerloop_ctx with torch.optim.Adam / SGD(momentum=0.9), per task
Every method computes the same meta-loss (checked before timing: the first losses must agree). Times are medians
of interleaved rounds, one step each.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

import fastmeta
from fastmeta import reference
from fastmeta.models import Conv4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from maml_resnet12 import torchopt_loop  # noqa: E402  (torchopt's MAML example, as the ResNet-12 table runs it)

LR = {"adam": 0.001, "momentum": 0.1}


def _batch(T: int, small: bool) -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(0)
    size, n, q = (16, 3, 2) if small else (28, 5, 15)
    y = torch.arange(n).repeat(T, 1)
    qy = torch.arange(n).repeat_interleave(q).repeat(T, 1)
    return fastmeta.TaskBatch(
        torch.rand(T, n, 1, size, size, generator=g), y, torch.rand(T, n * q, 1, size, size, generator=g), qy
    )


def _rule(name: str) -> fastmeta.algorithms.InnerOptimizer:
    return fastmeta.Adam() if name == "adam" else fastmeta.SGD(momentum=0.9)


def _fastmeta(model, b, name, steps):  # noqa: ANN001, ANN202
    out = fastmeta.maml_step(model, b, LR[name], steps, inner_opt=_rule(name))
    out.loss.backward()
    return out.loss.item()


def _loop(model, b, name, steps):  # noqa: ANN001, ANN202
    params = dict(model.named_parameters())
    names, rule, total = list(params), _rule(name), 0.0
    for t in range(b.num_tasks):
        fast = [params[n] for n in names]
        state = [list(x) for x in rule.init([p.detach() for p in fast]).tensors]
        for s in range(steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (b.support_x[t],)), b.support_y[t])
            g = [gi.unsqueeze(0) for gi in torch.autograd.grad(loss, fast, create_graph=True)]
            if name == "adam":
                new, m, v = reference.adam_update(fast, g, LR[name], *state, s + 1, rule.betas, rule.eps)
                state = [m, v]
            else:
                new, bufs = reference.sgd_update(fast, g, LR[name], state[0], rule.momentum)
                state = [bufs]
            fast = [p.squeeze(0) for p in new]
        qloss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (b.query_x[t],)), b.query_y[t])
        (qloss / b.num_tasks).backward()  # one task's graph at a time
        total += qloss.item() / b.num_tasks
    return total


def _torchopt(model, b, name, steps):  # noqa: ANN001, ANN202
    import torchopt

    inner = torchopt.MetaAdam(model, lr=LR[name]) if name == "adam" else torchopt.MetaSGD(model, LR[name], 0.9)
    return torchopt_loop(model, inner, b, steps)


def _higher(model, b, name, steps):  # noqa: ANN001, ANN202
    import higher

    opt = (
        torch.optim.Adam(model.parameters(), lr=LR[name])
        if name == "adam"
        else torch.optim.SGD(model.parameters(), lr=LR[name], momentum=0.9)
    )
    total = 0.0
    for t in range(b.num_tasks):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(b.support_x[t]), b.support_y[t]))
            loss = F.cross_entropy(fmodel(b.query_x[t]), b.query_y[t]) / b.num_tasks
            loss.backward()
            total += loss.item()
    return total


METHODS = {"fastmeta": _fastmeta, "loop": _loop, "torchopt": _torchopt, "higher": _higher}
PEERS = {"torchopt", "higher"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--small", action="store_true", help="toy sizes (16x16, 4 channels, 3-way): checks the script")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = [m for m in METHODS if m not in PEERS or importlib.util.find_spec(m) is not None]
    b = _batch(a.tasks, a.small)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Conv4 second order, T={a.tasks}, "
          f"S={a.steps}; ms per meta-step, medians of {a.rounds} rounds\n")  # fmt: skip
    print("| inner optimiser | " + " | ".join(methods) + " | fastmeta vs loop | vs best peer |")
    print("|---|" + "---:|" * (len(methods) + 2))
    for name in ("adam", "momentum"):
        torch.manual_seed(0)
        model = Conv4(n_way=3 if a.small else 5, hidden=4 if a.small else 64, image_size=16 if a.small else 28)
        losses = {m: METHODS[m](model, b, name, a.steps) for m in methods}  # warm-up, and the same loss
        for m, v in losses.items():
            if abs(v - losses["fastmeta"]) > 1e-4 * max(1.0, abs(v)):
                raise SystemExit(f"{m} computes another meta-loss ({v}) than fastmeta ({losses['fastmeta']})")
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(a.rounds):
            for m in methods:
                model.zero_grad(set_to_none=True)
                t = time.perf_counter()
                METHODS[m](model, b, name, a.steps)
                times[m].append(time.perf_counter() - t)
        ms = {m: 1e3 * statistics.median(v) for m, v in times.items()}
        peers = [ms[m] for m in methods if m in PEERS]
        vs_peer = f"{min(peers) / ms['fastmeta']:.2f}x" if peers else "-"
        cells = " | ".join(f"{ms[m]:.0f}" for m in methods)
        print(f"| {name} | {cells} | {ms['loop'] / ms['fastmeta']:.2f}x | {vs_peer} |", flush=True)


if __name__ == "__main__":
    main()
