"""The pretrained baselines' test-time fine-tuning: every task's new head fitted at once (fastmeta's
`fit_heads`) against Chen et al.'s way, one task at a time (a new nn.Linear or cosine head, torch.optim.SGD,
mini-batches of 4 over the support set for 100 epochs).

    python benchmarks/baseline_heads.py [--tasks 100] [--shots 1 5] [--dim 1600] [--threads 1] [--rounds 3]

Support embeddings are random (T, 5 * shots, D) float32 (D = 1600: Conv4-64 on 84x84 images); both methods fit
the same heads from the same draws (checked before timing: their query logits must agree). Times are medians of
interleaved rounds, milliseconds for all T tasks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.algorithms import baselines
from fastmeta.algorithms.baselines import cosine_logits, fit_heads, head_logits


class _Cosine(nn.Module):
    def __init__(self, weight: torch.Tensor, norm: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.weight, self.norm, self.scale = nn.Parameter(weight.clone()), nn.Parameter(norm.clone()), scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return cosine_logits(z, self.weight, self.norm, self.scale)


def per_task(z: torch.Tensor, y: torch.Tensor, q: torch.Tensor, kind: str, epochs: int) -> torch.Tensor:
    """Chen et al.'s fine-tuning, task by task; returns the query logits (T, Nq, 5)."""
    T, Ns, D = z.shape
    weight, second, orders = baselines._draws(T, 5, D, Ns, epochs, kind, 0, z)
    out = []
    for t in range(T):
        if kind == "linear":
            head = nn.Linear(D, 5)
            with torch.no_grad():
                head.weight.copy_(weight[t])
                head.bias.copy_(second[t])
        else:
            head = _Cosine(weight[t], second[t], 2.0)
        opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3)
        for e in range(epochs):
            for lo in range(0, Ns, 4):
                pick = orders[e, t, lo : lo + 4]
                opt.zero_grad()
                F.cross_entropy(head(z[t, pick]), y[t, pick]).backward()
                opt.step()
        with torch.no_grad():
            out.append(head(q[t]))
    return torch.stack(out)


def batched(z: torch.Tensor, y: torch.Tensor, q: torch.Tensor, kind: str, epochs: int) -> torch.Tensor:
    return head_logits(q, fit_heads(z, y, 5, kind, epochs, 0.01, scale=2.0), kind, 2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--dim", type=int, default=1600)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), T={args.tasks}, D={args.dim}, {args.epochs} epochs")
    print("| head | shots | fastmeta fit_heads (ms) | per-task torch.optim (ms) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("linear", "cosine"):
        for shots in args.shots:
            g = torch.Generator().manual_seed(shots)
            z = torch.randn(args.tasks, 5 * shots, args.dim, generator=g).relu()
            y = torch.arange(5).repeat_interleave(shots).expand(args.tasks, -1)
            q = torch.randn(args.tasks, 75, args.dim, generator=g).relu()
            a, b = batched(z, y, q, kind, args.epochs), per_task(z, y, q, kind, args.epochs)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # the same heads
            times: dict[str, list[float]] = {"fastmeta": [], "loop": []}
            for _ in range(args.rounds):
                for name, fn in (("fastmeta", batched), ("loop", per_task)):
                    tic = time.perf_counter()
                    fn(z, y, q, kind, args.epochs)
                    times[name].append(1000 * (time.perf_counter() - tic))
            f, p = statistics.median(times["fastmeta"]), statistics.median(times["loop"])
            print(f"| {kind} | {shots} | {f:.0f} | {p:.0f} | {p / f:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
