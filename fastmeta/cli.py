"""`python -m fastmeta`: the command line.

python -m fastmeta train [--algo maml|fomaml|metasgd|reptile|metalstm|snail|protonet|matching|siamese|pretrain]
python -m fastmeta eval CHECKPOINT [--episodes 1000]
python -m fastmeta bench [--device cpu|cuda] [--op all|fast_weight_update|contrastive|maml] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch


def _bench(args: argparse.Namespace) -> int:
    import fastmeta
    from fastmeta import bench

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    info = fastmeta.kernels_info()
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    kernels = "loaded" if info["available"] else f"MISSING: {info['error']}"
    print(
        f"fastmeta {fastmeta.__version__}, torch {torch.__version__}, device {args.device} ({where}), "
        f"{torch.get_num_threads()} CPU threads, kernels {kernels}"
    )
    if args.malloc == "warm" and args.device == "cpu":
        print(
            "glibc keeps freed memory in this process (see fastmeta.bench.keep_freed_memory):",
            bench.keep_freed_memory(),
        )
    rows: list[dict] = []
    workloads = [w for w in bench.WORKLOADS if args.workload in (None, w.name)]
    if args.op in ("all", "fast_weight_update"):
        rows = bench.run_fast_weight_update(args.device, workloads, min_time=args.min_time, rounds=args.rounds)
        print("\nfast_weight_update (median per call; speed-up = other method's time / fastmeta's)\n")
        print(bench.format_table(rows))
    if args.op in ("all", "contrastive"):
        sizes = tuple(int(n) for n in args.all_pairs_sizes.split(",") if n)
        more = bench.run_contrastive(
            args.device, args.min_time, args.rounds, pair_batch=args.pair_batch, all_pairs_sizes=sizes
        )
        print("\ncontrastive loss, forward+backward (median; peak memory over the inputs)\n")
        print(bench.format_table(more))
        rows += more
    if args.op in ("all", "maml"):
        from fastmeta import bench_maml

        names = [n for n in args.maml_workloads.split(",") if n]
        unknown = sorted(set(names) - {w.name for w in bench_maml.WORKLOADS})
        if unknown:
            print(f"error: --maml-workloads: unknown {unknown}; choose from sinusoid, conv4", file=sys.stderr)
            return 2
        maml_rows = bench_maml.run_maml(
            args.device,
            [w for w in bench_maml.WORKLOADS if w.name in names],
            min_time=args.min_time,
            rounds=args.rounds,
            memory=args.maml_memory == "yes",
        )
        print(
            "\nmaml_step: one meta-step (adapt T tasks, query loss, backward), median; speed-up = other / fastmeta; "
            "peak memory of one step in a fresh process\n"
        )
        print(bench.format_table(maml_rows))
        rows += maml_rows
    if args.device.startswith("cuda") and args.op in ("all", "fast_weight_update"):
        print("\nforward bandwidth (bytes read and written at least / median time) against a same-sized copy:\n")
        print("| workload | fastmeta | copy | fastmeta / copy |\n|---|---:|---:|---:|")
        for w in workloads:
            t = next(
                r["seconds"]
                for r in rows
                if r["workload"] == w.label and r["mode"] == "forward" and r["method"] == "fastmeta"
            )
            moved = bench.bytes_moved(w)
            copy = bench.copy_bandwidth(moved // 8, args.device)  # a copy of moved/2 bytes moves `moved` bytes
            print(f"| {w.label} | {moved / t / 1e9:.0f} GB/s | {copy / 1e9:.0f} GB/s | {moved / t / copy:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


def _default_out(config: object, resume: bool) -> str:
    """runs/<algo>-<dataset>[-<n>way<k>shot], numbered -2, -3, ... past existing runs (--resume: the latest)."""
    base = f"runs/{config.algo}-{config.dataset}" + (
        f"-{config.n_way}way{config.k_shot}shot" if config.dataset == "omniglot" else ""
    )
    names = [base] + [f"{base}-{i}" for i in range(2, 1000)]
    existing = [n for n in names if os.path.exists(n)]
    if resume:
        return existing[-1] if existing else base
    return next(n for n in names if not os.path.exists(n))


def _train(args: argparse.Namespace) -> int:
    from fastmeta import distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = _device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one GPU per process
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            print(
                f"error: torchrun started more processes on this machine than its {gpus} GPU(s): use "
                f"--nproc-per-node {gpus}, or --device cpu",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda", local)
    # under torchrun: one process group over all the processes (NCCL between GPUs, gloo between CPUs)
    rank, size = distributed.init_from_env("nccl" if device.type == "cuda" else "gloo")
    try:
        code = _train_in(args, rank, size, device)
    except BaseException:
        if size > 1:  # no barrier: the other ranks may be waiting in a collective that never comes
            torch.distributed.destroy_process_group()
        raise
    distributed.close()  # waits for rank 0's last checkpoint before any rank tears gloo down
    return code


def _device(name: str | None) -> torch.device:
    """--device: default cuda where available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    return device


def _train_in(args: argparse.Namespace, rank: int, size: int, device: torch.device) -> int:
    from fastmeta.train import RunConfig, train

    try:
        config = RunConfig.make(
            args.dataset,
            algo=args.algo,
            data=args.data,
            split=args.split,
            n_way=args.n_way,
            train_way=args.train_way,
            k_shot=args.k_shot,
            train_shot=args.train_shot,
            n_query=args.n_query,
            meta_batch=args.meta_batch,
            inner_steps=args.inner_steps,
            eval_inner_steps=args.eval_inner_steps,
            inner_lr=args.inner_lr,
            meta_lr=args.meta_lr,
            schedule=args.schedule,
            iterations=args.iterations,
            val_every=args.val_every,
            val_episodes=args.val_episodes,
            seed=args.seed,
            hidden=args.hidden,
            backbone=args.backbone,
            image_size=args.image_size,
            extra={
                k: v
                for k, v in (
                    ("fce", args.fce),
                    ("scale", args.scale),
                    ("margin", args.margin),
                    ("pairs", args.pairs),
                    ("zero_head", args.zero_head),
                    ("layers", args.layers),
                )
                if v is not None and v is not False  # a 0 the user gave is checked, not dropped
            }
            or None,
        )
        out = [args.out or _default_out(config, args.resume)]
        if size > 1:  # rank 0 names the folder: the others could see it already made and number theirs apart
            torch.distributed.broadcast_object_list(out, src=0)
        if rank == 0:
            where = f" on {size} processes" if size > 1 else ""
            print(f"fastmeta {config.algo} on {config.dataset}{where}: writing {out[0]}/", flush=True)
        result = train(config, out[0], resume=args.resume, time_limit=args.time_limit, plot=args.plot, device=device)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error{f' (rank {rank})' if size > 1 else ''}: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(result))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fastmeta.train import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = _device(args.device)
        r = evaluate(
            args.checkpoint,
            args.episodes,
            args.part,
            args.inner_steps,
            args.data,
            args.tasks_per_batch,
            device,
            n_way=args.n_way,
            k_shot=args.k_shot,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = r["config"]
    what = f"{c['n_way']}-way {c['k_shot']}-shot" if c["dataset"] == "omniglot" else f"{c['k_shot']}-shot"
    scale, unit = (100, "%") if r["metric"] == "accuracy" else (1, "")
    n = r["inner_steps"]  # None: no inner loop
    steps = "" if n is None else f", {n} inner step{'' if n == 1 else 's'}"
    print(
        f"{c['algo']} {c['dataset']} {what}, {args.part} split, {r['tasks']} tasks{steps}: "
        f"{r['metric']} {scale * r['mean']:.2f}{unit} +- {scale * r['ci95']:.2f}{unit} (95% CI)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmeta", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the kernels against the reference and the usual alternatives")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    b.add_argument(
        "--op", choices=["all", "fast_weight_update", "contrastive", "maml"], default="all", help="what to time"
    )
    b.add_argument(
        "--maml-workloads",
        default="sinusoid,conv4",
        help="maml_step: comma-separated workloads, sinusoid and/or conv4 (default both)",
    )
    b.add_argument("--maml-memory", choices=["yes", "no"], default="yes", help="peak memory of the S=5 2nd-order steps")
    b.add_argument("--workload", choices=["conv4", "mlp"], default=None, help="only this fast_weight_update workload")
    b.add_argument("--pair-batch", type=int, default=65536, help="contrastive pair mode: pairs per batch")
    b.add_argument(
        "--all-pairs-sizes",
        default="4096,8192",
        help="contrastive all-pairs mode: comma-separated N (default 4096,8192)",
    )
    b.add_argument("--min-time", type=float, default=0.6, help="seconds to time each measurement (default 0.6)")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (default 3)")
    b.add_argument(
        "--malloc",
        choices=["warm", "default"],
        default="warm",
        help="warm: keep freed memory in the process, so no method pays page faults by luck (default)",
    )
    b.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    b.set_defaults(func=_bench)

    from fastmeta.train import ALGOS, DATASETS

    t = sub.add_parser("train", help="meta-train a model (default: MAML on sinusoid regression)")
    t.add_argument(
        "--algo",
        choices=ALGOS,
        default="maml",
        help="gradient-based: maml, fomaml, metasgd, reptile; model-based: metalstm, snail; metric: protonet, "
        "matching, siamese; pretrain: the joint-training sinusoid baseline",
    )
    t.add_argument("--dataset", choices=DATASETS, default="sinusoid")
    t.add_argument("--data", default=None, help="Omniglot: a torchvision-style folder or the folder of the zips")
    t.add_argument("--split", choices=["vinyals", "lake"], default=None, help="Omniglot split (default vinyals)")
    t.add_argument("--out", default=None, help="run folder (default runs/<algo>-<dataset>...)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--time-limit", type=float, default=None, help="minutes; then save and stop")
    t.add_argument("--plot", action="store_true", help="write <out>/curve.png (needs matplotlib)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where available)")
    t.add_argument("--fce", type=int, default=None, metavar="STEPS", help="matching: full-context embeddings")
    t.add_argument(
        "--scale", type=float, default=None,
        help="matching: cosine similarities times this before the softmax (default 1, as Vinyals et al.)",
    )  # fmt: skip
    t.add_argument("--margin", type=float, default=None, help="siamese: contrastive margin (default 1)")
    t.add_argument(
        "--layers", type=int, default=None, help="sinusoid: hidden layers of the MLP, --hidden units each (default 2)"
    )
    t.add_argument(
        "--pairs", choices=["all_pairs", "pairs"], default=None,
        help="siamese: every pair of an episode (default) or each query with each support example",
    )  # fmt: skip
    t.add_argument(
        "--zero-head", action="store_true",
        help="maml, fomaml, metasgd, reptile, metalstm: the zeroing trick, every task adapts from a zero head "
        "(Kao et al. 2022)",
    )  # fmt: skip
    t.add_argument("--backbone", choices=["conv4", "koch"], default=None, help="metric learners' embedding")
    t.add_argument("--image-size", type=int, default=None, help="Omniglot images resized to this (default 28)")
    t.add_argument(
        "--schedule", choices=["constant", "linear", "cosine"], default=None,
        help="meta learning rate over --iterations, to 0 (default: linear for reptile, else constant)",
    )  # fmt: skip
    helps = {
        "train-way": "metric learners: classes per training episode (default: --n-way)",
        "train-shot": "support examples per class in training episodes (default: --k-shot; validation uses --k-shot)",
    }
    for name, kind in (
        ("n-way", int), ("train-way", int), ("k-shot", int), ("train-shot", int), ("n-query", int),
        ("meta-batch", int), ("inner-steps", int), ("eval-inner-steps", int), ("inner-lr", float), ("meta-lr", float),
        ("iterations", int), ("val-every", int), ("val-episodes", int), ("seed", int), ("hidden", int),
    ):  # fmt: skip
        text = helps.get(name, "default: per dataset and algorithm (see fastmeta.train)")
        t.add_argument(f"--{name}", type=kind, default=None, help=text)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="meta-test a checkpoint: mean accuracy (or MSE) with a 95%% confidence interval")
    e.add_argument("checkpoint", help="a checkpoint.pt or best.pt written by train")
    e.add_argument("--episodes", type=int, default=1000, help="test tasks (default 1000)")
    e.add_argument("--part", choices=["train", "val", "trainval", "test"], default="test")
    e.add_argument("--inner-steps", type=int, default=None, help="default: the run's eval_inner_steps")
    e.add_argument("--data", default=None, help="Omniglot location, if not where the run found it")
    e.add_argument(
        "--n-way", type=int, default=None, help="test episodes' classes (metric learners; default: the run's)"
    )
    e.add_argument("--k-shot", type=int, default=None, help="test episodes' shots (default: the run's)")
    e.add_argument("--tasks-per-batch", type=int, default=50)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where available)")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.set_defaults(func=_eval)
    args = parser.parse_args(argv)
    return args.func(args)
