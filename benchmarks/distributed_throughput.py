"""Meta-training throughput of 1 process against torchrun with 2 processes (gloo), in tasks per second.

python benchmarks/distributed_throughput.py [--data ../shared/data/omniglot] [--iterations 40] [--meta-batch T]

Each configuration is a real `python -m fastmeta train` run (the same command users type) timed by the run's
own clock, which excludes start-up; one validation at the end is included. Prints a markdown table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(procs: int, threads: int, args: list[str]) -> float:
    """Seconds of training reported by the run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        train = ["-m", "fastmeta", "train", *args, "--out", f"{tmp}/run", "--threads", str(threads)]
        train += ["--json", "--test-episodes", "0"]  # the training seconds as JSON; no test after the run
        if procs == 1:
            cmd = [sys.executable, *train]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *train]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="Omniglot folder or zips (adds the Omniglot workload)")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument(
        "--meta-batch", type=int, help="tasks per meta-step of every workload (default: sinusoid 25, Omniglot 32)"
    )
    a = p.parse_args()
    n = a.iterations
    tasks = a.meta_batch or 25
    sinusoid = ["--iterations", str(n * 10), "--val-every", str(n * 10), "--meta-batch", str(tasks)]
    workloads = [(f"sinusoid MAML, {tasks} tasks/step", tasks, sinusoid)]
    if a.data:
        tasks = a.meta_batch or 32
        omniglot = ["--dataset", "omniglot", "--data", a.data, "--iterations", str(n), "--val-every", str(n)]
        omniglot += ["--meta-batch", str(tasks), "--val-episodes", "1"]
        workloads.append((f"Omniglot 5-way 1-shot MAML, {tasks} tasks/step", tasks, omniglot))
    cores = os.cpu_count()
    head = f"1 process, {cores} threads | 1 process, 1 thread | 2 processes, 1 thread each | 2 proc / 1 proc"
    print(f"| workload | {head} |")
    print("|---|---:|---:|---:|---:|")
    for label, tasks, args in workloads:
        iters = int(args[args.index("--iterations") + 1])
        rates = [iters * tasks / run(procs, threads, args) for procs, threads in ((1, cores), (1, 1), (2, 1))]
        cells = " | ".join(f"{r:.0f} tasks/s" for r in rates)
        print(f"| {label} | {cells} | {rates[2] / rates[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
