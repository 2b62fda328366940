"""Evaluation's peak memory: a batch of mini-ImageNet-shaped test tasks adapted and predicted as
`fastmeta eval` does now (tasks_at_once at a time, within fastmeta.train.evaluation.EVAL_MEMORY on the CPU)
against all the batch's tasks at once (what it did before: 50 tasks, 5,000 84x84 images, in one forward).

    python benchmarks/eval_memory.py [--tasks 50] [--threads 2] [--small]

Each measurement runs in a fresh process and reports that process's peak resident memory (ru_maxrss, which
includes the interpreter and torch: about 0.4 GB here) and its seconds; both ways score the same tasks the same.
Rows: ProtoNets 5-way 5-shot (Conv4 64 channels, and ResNet-12), MAML 5-way 1-shot with Finn et al.'s
settings (Conv4 32 channels, 10 inner steps at test). Random weights and images: memory and time do not
depend on them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

ROWS = {
    "protonet-conv4": ("ProtoNets Conv4-64, 5-way 5-shot", {"algo": "protonet", "k_shot": 5}),
    "maml-conv4": ("MAML Conv4-32, 5-way 1-shot, 10 steps", {"algo": "maml", "hidden": 32, "k_shot": 1}),
    "protonet-resnet12": (
        "ProtoNets ResNet-12, 5-way 5-shot",
        {"algo": "protonet", "k_shot": 5, "backbone": "resnet12"},
    ),
}


def _measure(row: str, chunked: bool, tasks: int, small: bool, threads: int | None) -> dict:
    """In this process: one batch of `tasks` tasks through evaluate_model; its peak memory and seconds."""
    from fastmeta.data.episodes import EpisodeSampler
    from fastmeta.train import RunConfig, build_model, evaluation

    if threads:
        torch.set_num_threads(threads)
    settings = dict(ROWS[row][1])
    size = 32 if small else 84
    if small:
        settings.update(image_size=size, hidden=4)
        if settings.get("backbone") == "resnet12":
            settings["hidden"] = 8
    config = RunConfig.make("miniimagenet", data="(random)", meta_batch=tasks, **settings)
    torch.manual_seed(0)
    model, aux = build_model(config)
    images = torch.randint(0, 256, (20, 20, 3, size, size), dtype=torch.uint8)
    episodes = EpisodeSampler(images, config.n_way, config.k_shot, config.n_query, tasks, seed=2)
    if not chunked:
        evaluation.EVAL_MEMORY = 1 << 62  # every task of the batch at once, as before
    at_once = evaluation.tasks_at_once(config, episodes[0], "cpu")
    t = time.perf_counter()
    r = evaluation.evaluate_model(model, aux, config, episodes, 1, config.get("eval_inner_steps", 0))
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak, "seconds": seconds, "mean": r["mean"], "tasks_at_once": at_once}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=50, help="tasks in the batch (eval's --tasks-per-batch default)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--small", action="store_true", help="toy sizes (32x32, 4 channels): checks the script")
    p.add_argument("--child", nargs=2, metavar=("ROW", "WAY"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_measure(a.child[0], a.child[1] == "chunked", a.tasks, a.small, a.threads)))
        return
    print(f"torch {torch.__version__}, one batch of {a.tasks} tasks, each way in a fresh process\n")
    print("| workload | all tasks at once: peak | s | as built: tasks at once | peak | s | same score |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in a.rows:
        out = {}
        for way in ("all", "chunked"):
            cmd = [sys.executable, __file__, "--child", row, way, "--tasks", str(a.tasks)]
            cmd += ["--small"] if a.small else []
            cmd += ["--threads", str(a.threads)] if a.threads else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[way] = json.loads(done.stdout.strip().splitlines()[-1])
        before, now = out["all"], out["chunked"]
        same = "yes" if abs(before["mean"] - now["mean"]) < 1e-6 else f"no ({before['mean']} vs {now['mean']})"
        print(
            f"| {ROWS[row][0]} | {before['peak_bytes'] / 1e9:.2f} GB | {before['seconds']:.1f} | "
            f"{now['tasks_at_once']} | {now['peak_bytes'] / 1e9:.2f} GB | {now['seconds']:.1f} | {same} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
