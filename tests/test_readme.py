"""Every command README.md shows runs, scaled down, so that a renamed option or a changed output cannot leave the
README wrong; and `--help` works for the command and each subcommand.

Commands are read from the README itself: each line of a ```bash block (continuations joined) and each inline
code span that starts with a program of this project (`fastmeta`, `python -m fastmeta`, `torchrun`, `pytest`,
`python benchmarks/...`, `bash benchmarks/...`, `pip install`). Each must match one rule below, which either runs
it with settings that make it take seconds (few iterations, episodes and rounds) or skips it with the reason. A
command that matches no rule fails: a new README command needs a rule.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OMNIGLOT = Path(os.environ.get("FASTMETA_OMNIGLOT", ROOT.parent / "shared/data/omniglot"))
PROGRAMS = ("fastmeta ", "python -m fastmeta", "torchrun ", "pytest ", "python benchmarks/", "bash benchmarks/", "pip ")
SUBCOMMANDS = ("train", "eval", "bench", "plot")

# Appended to a command to make it take seconds; later options override the README's (argparse: last one wins).
SCALED_TRAIN = [
    "--iterations", "2", "--val-every", "2", "--val-episodes", "1", "--meta-batch", "2", "--test-episodes", "4",
]  # fmt: skip
SCALED_EVAL = ["--episodes", "4", "--tasks-per-batch", "4"]
SCALED_BENCH = [
    "--workload", "mlp", "--maml-workloads", "sinusoid", "--maml-memory", "no", "--min-time", "0.001",
    "--rounds", "1", "--pair-batch", "64", "--all-pairs-sizes", "40",
]  # fmt: skip


def _code_spans(text: str) -> list[str]:
    """The README's shell commands: ```bash lines (comments dropped, `\\` continuations joined) and inline spans."""
    commands, block = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            block = [] if line.strip() == "```bash" and block is None else None
            continue
        if block is not None:
            block.append(line)
            if not line.rstrip().endswith("\\"):
                joined = " ".join(part.rstrip().removesuffix("\\") for part in block)
                block = []
                command = joined.split(" #", 1)[0].strip()
                if command and not command.startswith("#"):
                    commands.append(command)
        else:
            for span in re.findall(r"`([^`\n]+)`", line):
                if span.startswith(PROGRAMS) or span in ("fastmeta", "python -m fastmeta"):
                    commands.append(span.strip())
    return list(dict.fromkeys(commands))  # each once, in order


def _concrete(command: str) -> str:
    """A README command with its meta-syntax made concrete: optional [...] parts dropped, `a|b` the first choice."""
    command = re.sub(r"\s*\[[^\]]*\]", "", command).replace(" ...", "")
    return " ".join(
        tok.split("|")[0] if "|" in tok and not tok.startswith(("'", '"')) else tok for tok in command.split()
    )


@dataclass
class Run:
    argv: list[str]
    env: dict[str, str] | None = None
    needs_omniglot: bool = False


FEWSHOT = ("folder", "miniimagenet", "cifarfs", "fc100", "cub")
SYNTHETIC = "@synthetic:"  # an argument standing for a synthetic copy of a dataset, written in the run's folder


def _synthetic(name: str, root: Path) -> Path:
    """A small dataset in `name`'s distributed layout (tests/test_fewshot_data.py's writers), with enough classes
    and images for 5-way 5-shot episodes of 15 queries in every split; written once per folder."""
    import test_fewshot_data as fs

    where = root / f"data-{name}"
    if not where.exists():
        {
            "folder": lambda: fs.make_folder(where, {part: [20] * 5 for part in ("train", "val", "test")}),
            "miniimagenet": lambda: fs.make_mini_csv(where, classes=(5, 5, 5), n=20),
            "cifarfs": lambda: fs.make_cifarfs(where, classes=(5, 5, 5), n=20),
            "fc100": lambda: fs.make_cifar100(where, train_per_class=15, test_per_class=5),
            "cub": lambda: fs.make_cub(where, counts=[20] * 20),
        }[name]()
    return where


Rule = Callable[[list[str]], "Run | str"]  # a Run, or the reason to skip


def _fastmeta(argv: list[str]) -> list[str]:
    """argv after the program: the same through the installed console script or `python -m fastmeta`."""
    return argv[1:] if argv[0] == "fastmeta" else argv[3:]


def _data(argv: list[str]) -> tuple[list[str], bool]:
    """PATH and the README's Omniglot location replaced by the Omniglot folder the tests use, or, for the few-shot
    image datasets (which cannot be downloaded here), by a synthetic copy in their layout."""
    dataset = argv[argv.index("--dataset") + 1] if "--dataset" in argv else "omniglot"
    path = f"{SYNTHETIC}{dataset}" if dataset in FEWSHOT else str(OMNIGLOT)
    out = [path if a in ("PATH", "../shared/data/omniglot") else a for a in argv]
    return out, str(OMNIGLOT) in out


def _train(argv: list[str]) -> Run | str:
    args, omniglot = _data(_fastmeta(argv))
    # the synthetic image datasets: the smallest images every backbone takes (ResNet-12: 16), one query a class
    smaller = ["--image-size", "16", "--n-query", "1"] if any(a.startswith(SYNTHETIC) for a in args) else []
    return Run([sys.executable, "-m", "fastmeta", *args, *SCALED_TRAIN, *smaller], needs_omniglot=omniglot)


def _eval(argv: list[str]) -> Run | str:
    args, omniglot = _data(_fastmeta(argv))
    return Run([sys.executable, "-m", "fastmeta", *args, *SCALED_EVAL], needs_omniglot=omniglot)


def _plot(argv: list[str]) -> Run | str:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "needs matplotlib"
    # RUN...: the run that the README's first command (python -m fastmeta train) wrote in the same folder
    args = ["runs/maml-sinusoid" if a.startswith("RUN") else a for a in _fastmeta(argv)]
    return Run([sys.executable, "-m", "fastmeta", *args])


def _bench(argv: list[str]) -> Run | str:
    args = _fastmeta(argv)
    if "cuda" in args and not torch.cuda.is_available():
        return "needs a CUDA device"
    return Run([sys.executable, "-m", "fastmeta", *args, *SCALED_BENCH])


def _torchrun(argv: list[str]) -> Run | str:
    if "--nnodes" in argv and argv[argv.index("--nnodes") + 1] != "1":
        return "needs several machines"
    i = argv.index("-m")
    args, omniglot = _data(argv[i + 2 :])
    launcher = [sys.executable, "-m", "torch.distributed.run", *argv[1:i]]
    return Run([*launcher, "-m", "fastmeta", *args, *SCALED_TRAIN, "--threads", "1"], needs_omniglot=omniglot)


def _on_this_machine(args: list[str]) -> list[str]:
    """A script's arguments, with `cuda` (its --device) replaced by `cpu` where no GPU is visible."""
    return args if torch.cuda.is_available() else [a if a != "cuda" else "cpu" for a in args]


def _script(argv: list[str]) -> Run | str:
    if argv[1] == "benchmarks/gpu_check.sh":
        return "needs a GPU machine" if not torch.cuda.is_available() else "builds and benchmarks for minutes"
    if argv[1] == "benchmarks/distributed_throughput.py":
        args, omniglot = _data(argv[2:])
        small = ["--iterations", "1", "--meta-batch", "2"]  # every configuration still runs, each for seconds
        return Run([sys.executable, str(ROOT / argv[1]), *args, *small], needs_omniglot=omniglot)
    if argv[1] == "benchmarks/maml_memory.py":  # every row, all in one fresh process
        small = ["--small", "--steps", "1", "2", "--repeats", "1", "--one-process"]
        return Run([sys.executable, str(ROOT / argv[1]), *argv[2:], *small])
    if argv[1] == "benchmarks/maml_resnet12.py":  # every method; their peaks in one fresh process
        tiny = ["--widths", "4", "8", "8", "8", "--image-size", "16", "--tasks", "2", "--steps", "1"]
        tiny += ["--min-time", "0", "--rounds", "1", "--one-process"]
        return Run([sys.executable, str(ROOT / argv[1]), *argv[2:], *tiny])
    if argv[1] == "benchmarks/contrastive_peers.py":
        tiny = ["--sizes", "64", "--min-time", "0", "--rounds", "1"]
        return Run([sys.executable, str(ROOT / argv[1]), *_on_this_machine(argv[2:]), *tiny])
    if argv[1] == "benchmarks/step_traffic.py":
        return Run([sys.executable, str(ROOT / argv[1]), *argv[2:], "--small", "--top", "3"])
    if argv[1] == "benchmarks/train_overlap.py":
        args = _on_this_machine(argv[2:])
        return Run([sys.executable, str(ROOT / argv[1]), *args, "--small", "--steps", "2", "--rounds", "1"])
    if argv[1] == "benchmarks/batch_norm_double_backward.py":
        args = _on_this_machine(argv[2:])
        return Run([sys.executable, str(ROOT / argv[1]), *args, "--small", "--min-time", "0", "--rounds", "1"])
    if argv[1] == "benchmarks/episode_prefetch.py":
        return Run([sys.executable, str(ROOT / argv[1]), *argv[2:], "--small", "--steps", "2", "--rounds", "1"])
    if argv[1] == "benchmarks/inner_opt.py":
        small = ["--small", "--tasks", "2", "--steps", "2", "--rounds", "1"]
        return Run([sys.executable, str(ROOT / argv[1]), *argv[2:], *small])
    if argv[1] == "benchmarks/eval_memory.py":  # each way in its own process, on toy Conv4s
        small = ["--small", "--tasks", "4", "--rows", "protonet-conv4", "maml-conv4"]
        return Run([sys.executable, str(ROOT / argv[1]), *argv[2:], *small])
    if argv[1] == "benchmarks/host_time.py":
        return Run([sys.executable, str(ROOT / argv[1]), *argv[2:], "--tasks", "2", "--rounds", "1"])
    if argv[1] == "benchmarks/fewshot_decode.py":  # writes its JPEGs under --root (here the run's folder)
        small = ["--root", "decode", "--classes", "8", "--per-class", "16", "--workers", "1", "--batches", "2"]
        return Run([sys.executable, str(ROOT / argv[1]), *argv[2:], *small])
    pytest.fail(f"README command with no scaled-down form in tests/test_readme.py: {shlex.join(argv)}")


def _pytest(argv: list[str]) -> Run | str:
    if "tests" in argv:
        return "the test suite itself (.ci/run runs it)"
    if argv[1:] == ["benchmarks"]:  # every benchmark once, untimed, the ResNet-12 ones on a toy network
        suite = [sys.executable, "-m", "pytest", "-q", "-x", str(ROOT / "benchmarks"), "--benchmark-disable"]
        return Run(suite, env={"FASTMETA_BENCH_SMALL": "1"})
    pytest.fail(f"README command with no scaled-down form in tests/test_readme.py: {shlex.join(argv)}")


RULES: list[tuple[str, Rule]] = [
    (r"(fastmeta|python -m fastmeta) train\b", _train),
    (r"(fastmeta|python -m fastmeta) eval\b", _eval),
    (r"(fastmeta|python -m fastmeta) bench\b", _bench),
    (r"(fastmeta|python -m fastmeta) plot\b", _plot),
    (r"torchrun .* -m fastmeta train\b", _torchrun),
    (r"(python|bash) benchmarks/", _script),
    (r"(FASTMETA_\w+=\S+ )?pytest\b", _pytest),
    (r"(pip install|.*&& .*pip install|CC=.* pip install|python setup.py)", lambda argv: "installs (.ci/run does)"),
]


def _plan(command: str) -> Run | str:
    concrete = _concrete(command)
    for pattern, rule in RULES:
        if re.match(pattern, concrete):
            argv = shlex.split(concrete)
            while argv and re.fullmatch(r"\w+=\S*", argv[0]):  # VAR=value prefixes
                argv = argv[1:]
            return rule(argv)
    pytest.fail(f"README command with no rule in tests/test_readme.py: {command!r}")


COMMANDS = _code_spans(README.read_text())


def test_readme_commands_are_found():
    """The extraction sees the commands it must (else every other test here would pass vacuously)."""
    assert "python -m fastmeta train" in COMMANDS
    assert any(c.startswith("python -m fastmeta eval") for c in COMMANDS)
    assert any(c.startswith("torchrun") for c in COMMANDS)
    assert _concrete("fastmeta bench [--device cuda]") == "fastmeta bench"
    assert _concrete("fastmeta train --dataset folder|cub --algo maml") == "fastmeta train --dataset folder --algo maml"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command, capsys):
    """Each command line the README shows (as the slow tier would run it) is one the CLI accepts: no missing
    argument, no unknown option, no prose mention taken for a command. Fast: parses, runs nothing."""
    from fastmeta.cli import build_parser

    plan = _plan(command)
    if isinstance(plan, str) or "fastmeta" not in plan.argv:
        pytest.skip("not a fastmeta command line" if not isinstance(plan, str) else plan)
    args = plan.argv[plan.argv.index("fastmeta") + 1 :]
    try:
        build_parser().parse_args(args)
    except SystemExit as e:
        if e.code == 0:  # --help
            return
        pytest.fail(f"{command!r} is not a command line the CLI accepts: {capsys.readouterr().err.strip()[-400:]}")
        raise AssertionError from e


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all README commands, as a user's: eval reads the runs/ that train wrote."""
    return tmp_path_factory.mktemp("readme")


def _checkpoint_arg(argv: list[str]) -> Path | None:
    return next((Path(a) for a in argv if a.endswith(".pt")), None)


def _ensure_checkpoint(run: Run, workdir: Path) -> None:
    """An eval of runs/<algo>-<dataset>[-<n>way<k>shot]/best.pt that no README train wrote: train it first."""
    ckpt = _checkpoint_arg(run.argv)
    if ckpt is None or (workdir / ckpt).exists():
        return
    m = re.fullmatch(r"runs/(\w+)-(\w+?)(?:-(\d+)way(\d+)shot)?/(best|checkpoint)\.pt", ckpt.as_posix())
    assert m, f"eval of {ckpt}: not a run folder the README's train commands write"
    algo, dataset, n_way, k_shot, _ = m.groups()
    argv = ["fastmeta", "train", "--algo", algo, "--dataset", dataset]
    if dataset != "sinusoid":
        argv += ["--data", "PATH", "--n-way", n_way, "--k-shot", k_shot]
    _execute(_train(argv), workdir)
    assert (workdir / ckpt).exists(), f"training {algo} on {dataset} did not write {ckpt}"


def _execute(run: Run, workdir: Path) -> subprocess.CompletedProcess:
    if run.needs_omniglot and not OMNIGLOT.exists():
        pytest.skip(f"Omniglot not found at {OMNIGLOT} (set FASTMETA_OMNIGLOT)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(run.env or {})}
    argv = [str(_synthetic(a[len(SYNTHETIC) :], workdir)) if a.startswith(SYNTHETIC) else a for a in run.argv]
    p = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    where = f"{shlex.join(argv)}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    assert p.returncode == 0, f"exit status {p.returncode}: {where}"
    assert "Traceback" not in p.stderr, where
    return p


def _same_run(plan: Run, command: str) -> str | None:
    """An earlier README command whose scaled-down run is exactly `plan` (e.g. `fastmeta bench`, `python -m fastmeta
    bench` and `fastmeta bench [--device cuda]` on a machine without a GPU all run `python -m fastmeta bench ...`)."""
    for earlier in COMMANDS[: COMMANDS.index(command)]:
        try:
            other = _plan(earlier)
        except pytest.fail.Exception:  # fails in its own test
            continue
        if isinstance(other, Run) and (other.argv, other.env) == (plan.argv, plan.env):
            return earlier
    return None


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, workdir):
    plan = _plan(command)
    if isinstance(plan, Run) and (earlier := _same_run(plan, command)):
        plan = f"the same run as {earlier!r} (which its test runs)"
    if isinstance(plan, str):
        print(f"skipped {command!r}: {plan}")
        pytest.skip(plan)
    _ensure_checkpoint(plan, workdir)
    _execute(plan, workdir)


def _installed() -> bool:
    """Whether fastmeta is installed as a distribution (pip install), not only built in place."""
    try:
        importlib.metadata.distribution("fastmeta")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _help_commands() -> list[tuple[str, list[str]]]:
    script = shutil.which("fastmeta")
    forms = [("python -m fastmeta", [sys.executable, "-m", "fastmeta"])]
    if script is not None:
        forms.append(("fastmeta", [script]))
    elif _installed():  # an installed package must have its console script (an in-place build has none)
        forms.append(("fastmeta", ["fastmeta"]))
    return [(f"{name} {sub}".strip(), [*argv, *([sub] if sub else []), "--help"]) for name, argv in forms
            for sub in ("", *SUBCOMMANDS)]  # fmt: skip


def test_every_subcommand_is_covered():
    """SUBCOMMANDS is the parser's list (a new subcommand gets a --help test without editing this file)."""
    p = subprocess.run([sys.executable, "-m", "fastmeta", "--help"], capture_output=True, text=True, cwd=ROOT)
    listed = re.search(r"\{([\w,]+)\}", p.stdout)
    assert listed, p.stdout + p.stderr
    assert set(listed.group(1).split(",")) == set(SUBCOMMANDS)


@pytest.mark.parametrize("name,argv", _help_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_help(name, argv):
    if argv[0] == "fastmeta":
        pytest.fail("the installed package has no `fastmeta` console script on PATH")
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, f"{name} --help: {p.returncode}\n{p.stderr}"
    assert p.stdout.startswith("usage:"), p.stdout
