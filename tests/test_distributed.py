"""Meta-training over processes: 2 gloo processes on loopback (torchrun) against 1 process on the same tasks."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmeta import distributed, maml_step
from fastmeta.cli import main
from fastmeta.data import EpisodeSampler, SinusoidTasks, shard_range

HERE = Path(__file__).parent
ROOT = HERE.parent
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="no gloo backend"
)


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node n ARGS`, from the repository root, 1 thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # the ranks' tracebacks and what C++ printed before an abort (not the progress bars)
    errors = [line for line in done.stderr.splitlines() if "it/s" not in line and "s/it" not in line]
    assert done.returncode == 0, done.stdout[-2000:] + "\n".join(errors[-60:])
    return done


def test_shard_range_splits_the_meta_batch():
    for tasks in (1, 2, 5, 7, 32):
        for size in range(1, tasks + 1):
            parts = [shard_range(tasks, r, size) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(tasks))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    with pytest.raises(ValueError, match="meta-batch of 2 tasks cannot be split over 3 processes"):
        shard_range(2, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        shard_range(4, 2, 2)
    with pytest.raises(ValueError, match="meta-batch of 1 tasks"):
        EpisodeSampler(torch.rand(6, 3, 2), 2, 1, 1, tasks=1, shard=(1, 2))


@pytest.mark.parametrize("size", [2, 3])
def test_shards_are_the_unsharded_tasks(size):
    """The ranks' tasks of episode i, put together, are exactly the single-process episode i."""
    data = torch.rand(9, 6, 2, 3)
    samplers = [
        lambda shard: EpisodeSampler(data, 3, 2, 1, tasks=7, seed=3, shard=shard),
        lambda shard: SinusoidTasks(4, 3, tasks=7, seed=3, shard=shard),
    ]
    for make in samplers:
        whole = make((0, 1))[11]
        parts = [make((r, size))[11] for r in range(size)]
        for name in ("support_x", "support_y", "query_x", "query_y"):
            torch.testing.assert_close(
                torch.cat([getattr(p, name) for p in parts]), getattr(whole, name), rtol=0, atol=0
            )


def test_all_reduce_gradients_alone_scales_by_the_weight():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    a.grad = torch.full((3,), 2.0)
    extra = torch.tensor([1.0, 5.0])
    assert distributed.world() == (0, 1) and distributed.init_from_env() == (0, 1)
    assert distributed.all_reduce_gradients([a, b], 0.25, extra) is extra
    torch.testing.assert_close(a.grad, torch.full((3,), 0.5))
    assert b.grad is None
    distributed.close()  # nothing to close
    assert distributed.world() == (0, 1)


def _oracle(tasks: int) -> dict:
    spec = importlib.util.spec_from_file_location("dist_worker", HERE / "dist_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.meta_gradients(tasks), module.MODES


@needs_gloo
@pytest.mark.parametrize("host_group", ["default", "separate"])
@pytest.mark.slow  # several processes: the slow tier
def test_two_processes_give_the_single_process_meta_gradient(tmp_path, host_group):
    """2 gloo processes, 5 tasks split 2 + 3: MAML, FOMAML, Meta-SGD, Reptile, prototypical, Siamese, matching
    (with full-context embeddings), SNAIL and Meta-LSTM meta-gradients (and DDP around a meta-step module) equal
    one process's on all 5 tasks, in float64. "separate": which parameters have gradients and the stop flag go
    through a gloo group of their own, as in NCCL jobs."""
    out = tmp_path / "grads.pt"
    torchrun(2, str(HERE / "dist_worker.py"), str(out), "5", host_group)
    got = torch.load(out, weights_only=False)
    want, modes = _oracle(5)
    assert got["world size"] == 2 and got["tasks seen"] == [2, 3] and want["tasks seen"] == 5
    for mode in modes + ("ddp",):
        ref = want["maml" if mode == "ddp" else mode]
        assert len(got[mode]) == len(ref)
        for g, w in zip(got[mode], ref):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=mode)
    for mode in modes:
        assert got[mode + " loss"] == pytest.approx(want[mode + " loss"], rel=1e-9)
    assert "DistributedDataParallel" in got["ddp error"] and "all_reduce_gradients" in got["ddp error"]
    assert got["presence"] == ([1.0, 1.0], True) and got["any rank"] == (True, False)


SIN = [
    "--device",
    "cpu",
    "--iterations",
    "6",
    "--val-every",
    "3",
    "--val-episodes",
    "2",
    "--meta-batch",
    "5",
    "--inner-steps",
    "2",
    "--json",  # the final validation as a JSON line, which the test reads
    "--test-episodes",
    "0",  # no test of best.pt after the run (the runs are compared by their weights)
]


def _params(path: Path) -> dict:
    return torch.load(path / "checkpoint.pt", weights_only=False)["model"]


@needs_gloo
@pytest.mark.slow  # several processes: the slow tier
@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_torchrun_train_equals_one_process(tmp_path, capsys, algo):
    """`torchrun --nproc-per-node 2 -m fastmeta train` trains the same model as one process; only rank 0
    prints and writes; a 2-process run resumed by 1 process continues the same run (and says so)."""
    one, two, moved = tmp_path / "one", tmp_path / "two", tmp_path / "moved"
    args = ["train", "--algo", algo, *SIN]
    assert main(args + ["--out", str(one)]) == 0
    capsys.readouterr()
    done = torchrun(2, "-m", "fastmeta", *args, "--out", str(two))
    assert done.stdout.count("writing") == 1 and "on 2 processes" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1])["iteration"] == 6
    assert done.stdout.count('"iteration"') == 1  # one final line, from rank 0
    a, b = _params(one), _params(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert torch.load(two / "checkpoint.pt", weights_only=False)["world_size"] == 2
    assert len((two / "history.jsonl").read_text().splitlines()) == 2
    # interrupted after one step on 2 processes, resumed on 1
    torchrun(2, "-m", "fastmeta", *args, "--out", str(moved), "--time-limit", "0")
    assert torch.load(moved / "checkpoint.pt", weights_only=False)["iteration"] == 1
    assert main(args + ["--out", str(moved), "--resume"]) == 0
    assert "written by a run on 2 process(es), this one has 1" in capsys.readouterr().out
    c = _params(moved)
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-6)


CLOSE_WORKER = """
import os, sys
import torch
from fastmeta import distributed
distributed.init_from_env("gloo")
torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo, as `fastmeta train` does
distributed.close()
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
with open(os.path.join(sys.argv[1], "threads_" + os.environ["RANK"]), "w") as f:  # a file each: no interleaving
    f.write(" ".join(names))
"""


@needs_gloo
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc to list threads")
@pytest.mark.slow  # several processes: the slow tier
def test_close_frees_the_process_group(tmp_path):
    """After `close`, no gloo thread is left, even when torch._dynamo was imported after the group was made
    (torch.distributed.nn would otherwise keep the group alive, and its threads abort at exit now and then)."""
    script = tmp_path / "close_worker.py"
    script.write_text(CLOSE_WORKER)
    torchrun(2, str(script), str(tmp_path))
    for rank in (0, 1):
        names = (tmp_path / f"threads_{rank}").read_text()
        assert names and "gloo" not in names, f"rank {rank}'s threads after close(): {names}"


@needs_gloo
@pytest.mark.slow  # several processes: the slow tier
def test_meta_batch_smaller_than_the_world_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "fastmeta"]
    cmd += ["train", "--device", "cpu", "--meta-batch", "1", "--iterations", "2", "--out", str(tmp_path / "r")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "meta-batch of 1 tasks cannot be split over 2 processes" in done.stderr


def test_ddp_model_is_refused_with_a_pointer(tmp_path):
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):  # no process group needed to test the check
        def __init__(self, module):  # noqa: ANN001
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(TypeError, match="all_reduce_gradients"):
        maml_step(
            FakeDDP(torch.nn.Linear(1, 1)),
            SinusoidTasks(2, 2, tasks=2)[0],
            0.1,
            1,
            loss_fn=torch.nn.functional.mse_loss,
        )
