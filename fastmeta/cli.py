"""`python -m fastmeta`: the command line.

python -m fastmeta train [--algo LEARNER] [--dataset DATASET] [options]   (--help: every learner and option)
python -m fastmeta eval CHECKPOINT [--episodes 1000]
python -m fastmeta bench [--device cpu|cuda] [--op all|fast_weight_update|contrastive|maml] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import textwrap
import warnings
from dataclasses import fields

import torch


def _bench(args: argparse.Namespace) -> int:
    import fastmeta
    from fastmeta._bench import kernels as bench

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
            "glibc keeps freed memory in this process (see fastmeta._bench.kernels.keep_freed_memory):",
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
        from fastmeta._bench import maml as bench_maml

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
        print(bench.bandwidth_table(rows, workloads, args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


def _default_out(config: object, resume: bool) -> str:
    """runs/<algo>-<dataset>[-<n>way<k>shot], numbered -2, -3, ... past existing runs (--resume: the latest)."""
    classes = "n_way" in config.spec.reads
    base = f"runs/{config.algo}-{config.dataset}" + (f"-{config.n_way}way{config.k_shot}shot" if classes else "")
    names = [base] + [f"{base}-{i}" for i in range(2, 1000)]
    # an empty folder (left by a run that failed before fastmeta made them lazily) is free to reuse
    existing = [n for n in names if os.path.exists(n) and not (os.path.isdir(n) and not os.listdir(n))]
    if resume:
        return existing[-1] if existing else base
    return next(n for n in names if n not in existing)


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
        with _one_line_warnings():
            code, finished = _train_in(args, rank, size, device)
    except BaseException:
        if size > 1:  # no barrier: the other ranks may be waiting in a collective that never comes
            torch.distributed.destroy_process_group()
        raise
    distributed.close()  # waits for rank 0's last checkpoint before any rank tears gloo down
    if finished is not None:  # rank 0, after the others are released: the test is its alone
        _report(args, *finished, device)
    return code


@contextlib.contextmanager
def _one_line_warnings():  # noqa: ANN202
    """Warnings of a run (e.g. a partial copy of a dataset) as one line on stderr, not Python's two."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        yield


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _settings(args: argparse.Namespace) -> dict:
    """The settings given on the command line (None: not given), for RunConfig.make. Raises ValueError for a
    learner option the chosen learner does not read."""
    from fastmeta.algorithms import LEARNERS
    from fastmeta.train import RunConfig, unread_option

    learner = LEARNERS[args.algo or RunConfig.algo]  # the dataclass's default learner
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name != "options"}
    for name in sorted(_learner_options()):
        value = getattr(args, name)
        if value is not None and learner.option(name) is None:
            raise ValueError(unread_option(learner, name, _flag))
        given[name] = value
    return {**given, "dataset": args.dataset or "sinusoid"}


def _learner_options() -> dict:
    """Every learner option by name: (the option as its first reader declares it, the learners that read it)."""
    from fastmeta.algorithms import LEARNERS

    found: dict = {}
    for learner in LEARNERS.values():
        for option in learner.options:
            first, readers = found.setdefault(option.name, (option, []))
            if (first.type, first.choices) != (option.type, option.choices):
                raise TypeError(f"option {option.name}: {learner.name} declares another type or choices")
            readers.append(learner.name)
    return found


def _train_in(args: argparse.Namespace, rank: int, size: int, device: torch.device) -> tuple[int, tuple | None]:
    """(exit status, and on rank 0 after a run: (config, folder, last validation) to report)."""
    from fastmeta.train import RunConfig, train

    try:
        config = RunConfig.make(**_settings(args))
        out = [args.out or _default_out(config, args.resume)]
        if size > 1:  # rank 0 names the folder: the others could see it already made and number theirs apart
            torch.distributed.broadcast_object_list(out, src=0)
        if rank == 0:
            where = f" on {size} processes" if size > 1 else ""
            print(f"fastmeta {config.algo} on {config.dataset}{where}: writing {out[0]}/", flush=True)
        result = train(config, out[0], resume=args.resume, time_limit=args.time_limit, plot=args.plot, device=device)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error{f' (rank {rank})' if size > 1 else ''}: {e}", file=sys.stderr)
        return 2, None
    return 0, (config, out[0], result) if rank == 0 else None


def _report(args: argparse.Namespace, config: object, out: str, result: dict, device: torch.device) -> None:
    """The end of a run: its test (with the baseline on the same tasks, where there is one), where its files
    are and the next command; with --json, one JSON line instead."""
    from fastmeta.train import summarize_run

    summary = summarize_run(out, config, args.test_episodes, device)
    if args.json:
        test = None if summary is None else {k: v for k, v in summary["test"].items() if k != "config"}
        extra = {} if summary is None else {"test": test, "baseline": summary["baseline_run"]}
        print(json.dumps({**result, **extra}))
        return
    lines = []
    done = result.get("iteration", 0)
    if done < config.iterations:
        lines.append(f"stopped at iteration {done} of {config.iterations}: the same command with --resume continues")
    if summary is not None:
        t = summary["test"]
        scale, unit, digits = (100, "%", 2) if t["metric"] == "accuracy" else (1, "", 3)

        def score(mean: float, ci: float) -> str:
            return f"{scale * mean:.{digits}f}{unit} +- {scale * ci:.{digits}f}{unit}"

        c, n = t["config"], t["inner_steps"]
        what = f"{c['n_way']}-way {c['k_shot']}-shot" if "n_way" in config.spec.reads else f"{c['k_shot']}-shot"
        steps = "" if n is None else f", {n} inner step{'' if n == 1 else 's'}"
        lines.append(
            f"test: {t['metric']} {score(t['mean'], t['ci95'])} (95% CI), {t['tasks']} {what} tasks of the test "
            f"split{steps}, {out}/best.pt"
        )
        b, baseline = summary["baseline_run"], summary["baseline"]
        if b is not None:
            ratio = f", {t['mean'] / b['mean']:.3f} times the baseline's" if t["metric"] == "mse" else ""
            lines.append(
                f"  {baseline} baseline on the same tasks: {t['metric']} {score(b['mean'], b['ci95'])} ({b['path']}); "
                f"{config.algo} minus {baseline}: {score(b['difference'], b['difference_ci95'])} (paired 95% CI)"
                + ratio
            )
        elif baseline is not None:
            where = os.path.join(os.path.dirname(out) or ".", f"{baseline}-{config.dataset}")
            lines.append(
                f"  no {baseline} baseline beside this run to compare with: python -m fastmeta train --algo {baseline} "
                f"--out {where} trains one (with this run's --k-shot and --n-query), and then the summary compares"
            )
    curve = f"{out}/curve.png" if args.plot else f"{out}/history.jsonl (--plot draws curve.png)"
    lines.append(f"checkpoints: {out}/best.pt (best validation), {out}/checkpoint.pt (latest); curve: {curve}")
    lines.append(f"next: python -m fastmeta eval {out}/best.pt")
    print("\n".join(lines))


def _eval(args: argparse.Namespace) -> int:
    from fastmeta.data.registry import DATASETS
    from fastmeta.train import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = _device(args.device)
        with _one_line_warnings():
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
    classes = "n_way" in DATASETS[c["dataset"]].reads
    what = f"{c['n_way']}-way {c['k_shot']}-shot" if classes else f"{c['k_shot']}-shot"
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


def _plot(args: argparse.Namespace) -> int:
    from fastmeta.train.plot import plot_runs

    try:
        rows = plot_runs(args.runs, args.out, args.x)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(r["label"]) for r in rows)
    print(f"{'run':<{width}}  best validation         reached at               last")
    for r in rows:
        best = f"{100 * r['best_val']:.2f}%" if r["metric"] == "accuracy" else f"{r['best_val']:.4g}"
        print(
            f"{r['label']:<{width}}  {best:<22}  {r['best_minutes']:7.1f} min, it {r['best_iteration']:<7}  "
            f"{r['minutes']:7.1f} min, it {r['iterations']}"
        )
    print(f"plot: {args.out}")
    return 0


def _learners_help() -> str:
    from fastmeta.algorithms import LEARNERS

    lines = ["learners (--algo):"]
    for learner in LEARNERS.values():
        reads = ", ".join(_flag(o.name) for o in learner.options) or "no options of its own"
        text = f"{learner.name}: {learner.summary} [reads {reads}]"
        lines += textwrap.wrap(text, 100, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def _add_run_settings(group: argparse._ArgumentGroup) -> None:
    """One option per RunConfig setting, with its help and per-dataset defaults (fastmeta.data.registry)."""
    from fastmeta.data.registry import DATASETS
    from fastmeta.train import RunConfig

    for f in fields(RunConfig):
        if f.name == "options":
            continue
        meta = f.metadata
        per_dataset = {n: d.settings.get(f.name, f.default) for n, d in DATASETS.items()}
        if f.name not in ("algo", "dataset") and len(set(map(str, per_dataset.values()))) > 1:
            default = "default: " + ", ".join(f"{n} {v}" for n, v in per_dataset.items())
        else:
            default = "" if f.default is None else f"default {f.default}"
        readers = [n for n, d in DATASETS.items() if f.name in d.reads]
        only = f"{', '.join(readers)}: " if readers and len(readers) < len(DATASETS) else ""
        text = f"{only}{meta['help']}" + (f" ({default})" if default else "")
        kind = meta["type"]
        if kind is bool:  # a flag (None: not given, so the dataset's default holds)
            group.add_argument(_flag(f.name), action="store_true", default=None, help=text)
        else:
            group.add_argument(_flag(f.name), type=kind, choices=meta.get("choices"), default=None, help=text)


def _add_learner_options(group: argparse._ArgumentGroup) -> None:
    """One option per learner option, saying which learners read it and their defaults."""
    from fastmeta.algorithms import LEARNERS

    for name, (option, readers) in _learner_options().items():
        defaults: dict[str, list[str]] = {}
        for reader in readers:
            o = LEARNERS[reader].option(name)
            text = "" if o.default is None else str(o.default)
            text += "".join(f", {d} {v}" for d, v in o.per_domain.items() if v not in (None, o.default))
            defaults.setdefault(text, []).append(reader)
        said = "; ".join(f"{', '.join(who)}: {text}" for text, who in defaults.items() if text)
        text = f"{', '.join(readers)}: {option.help}" + (f" (default {said})" if said else "")
        if option.type is bool:
            group.add_argument(_flag(name), action="store_true", default=None, help=text)
        else:
            group.add_argument(
                _flag(name), type=option.type, choices=option.choices, default=None, metavar=option.metavar, help=text
            )


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: one subcommand each for bench, train, eval and plot."""
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

    t = sub.add_parser(
        "train",
        help="meta-train a model (default: MAML on sinusoid regression)",
        description="Meta-train a model: the run's settings, then the options of the learners that read them "
        "(an option the chosen --algo does not read is an error).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_learners_help(),
    )
    t.add_argument("--out", default=None, help="run folder (default runs/<algo>-<dataset>...)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (same settings; --recompute may change)",
    )
    t.add_argument("--time-limit", type=float, default=None, help="minutes; then save and stop")
    t.add_argument("--plot", action="store_true", help="write <out>/curve.png (needs matplotlib)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where available)")
    t.add_argument(
        "--test-episodes", type=int, default=1000,
        help="test tasks the run ends with, on best.pt (and on a baseline run beside it; default 1000, 0: none)",
    )  # fmt: skip
    t.add_argument(
        "--json", action="store_true", help="end with one JSON line (final validation, test) instead of the summary"
    )
    _add_run_settings(t.add_argument_group("run settings (defaults per dataset and learner)"))
    _add_learner_options(t.add_argument_group("learner options (each read by the learners it names)"))
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="meta-test a checkpoint: mean accuracy (or MSE) with a 95%% confidence interval")
    e.add_argument("checkpoint", help="a checkpoint.pt or best.pt written by train")
    e.add_argument("--episodes", type=int, default=1000, help="test tasks (default 1000)")
    e.add_argument("--part", choices=["train", "val", "trainval", "test"], default="test")
    e.add_argument("--inner-steps", type=int, default=None, help="default: the run's eval_inner_steps")
    e.add_argument("--data", default=None, help="the dataset's location, if not where the run found it")
    e.add_argument(
        "--n-way", type=int, default=None, help="test episodes' classes (metric learners; default: the run's)"
    )
    e.add_argument("--k-shot", type=int, default=None, help="test episodes' shots (default: the run's)")
    e.add_argument("--tasks-per-batch", type=int, default=50)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where available)")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.set_defaults(func=_eval)

    p = sub.add_parser(
        "plot",
        help="draw runs' validation accuracy against wall-clock on one plot",
        description="Draw the validation score of one or more runs (their folders' history.jsonl) against "
        "wall-clock minutes or meta-iterations on one plot, and print each run's best and when it got there.",
    )
    p.add_argument("runs", nargs="+", help="run folders written by train (--out)")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default curves.png)")
    p.add_argument("--x", choices=["seconds", "iteration"], default="seconds", help="x axis (default: wall-clock)")
    p.set_defaults(func=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
