"""Peak memory of one benchmark step. CUDA: in this process, the caching allocator's peak. CPU: in a fresh process
(`python -m fastmeta._bench.memory KIND ARGS`, so that earlier work does not hide the peak): the peak resident
set over the resident set just before the step, after one call of a small warm-up step so that code and
libraries loaded on first use are not counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch

Step = Callable[[], object]

# For a probe's process: glibc returns every freed block above 128 KiB to the system, so that the resident set
# follows what is alive rather than what malloc kept (without it, one all-pairs step at N=8192 read 50 MiB
# instead of 10).
RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _all_pairs(warmup: bool, device: str, method: str, N: int, D: int) -> Step:
    from fastmeta._bench.kernels import all_pairs_step

    return all_pairs_step(method, 64 if warmup else N, D, device)


def _maml(warmup: bool, device: str, method: str, name: str, tasks: int, inner_steps: int, first_order: bool) -> Step:
    from fastmeta._bench.maml import MamlWorkload, step

    return step(method, MamlWorkload(name, tasks, inner_steps, first_order), device, tasks=2 if warmup else None)


# KIND -> make(warmup, device, **args): the step whose memory is measured (warmup: a small one of the same code).
STEPS: dict[str, Callable[..., Step]] = {"all_pairs": _all_pairs, "maml": _maml}


def step_peak_memory(device: str, kind: str, **args: object) -> int:
    """Peak bytes of one call of the STEPS[kind] step made from `args`, over what was resident before it."""
    if device.startswith("cuda"):
        return device_peak(STEPS[kind](False, device, **args), device)
    # The child imports this very fastmeta (not a source folder that happens to be its working directory).
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = ["-m", "fastmeta._bench.memory", kind, json.dumps(args)]
    return probe(argv, f"{kind} {args}", {"PYTHONPATH": pkg_parent}, cwd=tempfile.gettempdir())


def device_peak(step: Step, device: str) -> int:
    """Peak bytes of step() over what was in use just before it: CUDA's allocated bytes on a GPU (in this process),
    the resident set on the CPU (see resident_peak: call it in a fresh process, after a small warm-up)."""
    if not device.startswith("cuda"):
        return resident_peak(step)[0]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def probe(argv: list[str], what: str, env: dict[str, str] | None = None, cwd: str | None = None) -> int:
    """Runs `python ARGV` in a fresh process (glibc returning freed memory, RETURN_FREED_MEMORY) and returns the
    integer on the last line of its output: a probe that prints one peak. Raises with its stderr if it fails."""
    return probe_lines(argv, what, 1, env, cwd)[0]


def probe_lines(
    argv: list[str], what: str, n: int, env: dict[str, str] | None = None, cwd: str | None = None
) -> list[int]:
    """probe of a process that prints n peaks, one a line: the integers on the last n lines of its output."""
    out = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **RETURN_FREED_MEMORY, **(env or {})},
        cwd=cwd,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {what} failed:\n{out.stderr[-3000:]}")
    return [int(line) for line in out.stdout.strip().splitlines()[-n:]]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key + ":")).split()[1]) * 1024


def resident_peak(step: Callable[[], object]) -> tuple[int, object]:
    """(peak resident bytes of step() in this process over the resident set just before it, its result). Run it
    in a fresh process after a small warm-up, so that earlier work and first-use loading are not counted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        pass
    # VmHWM, not ru_maxrss: the latter survives exec and would report the parent's size at fork.
    base = _status("VmRSS")
    out = step()
    return _status("VmHWM") - base, out


def main(argv: list[str]) -> None:
    """(In the fresh process.) Prints the peak bytes of the step KIND made from the JSON ARGS."""
    make, args = STEPS[argv[0]], json.loads(argv[1])
    make(True, "cpu", **args)()
    print(resident_peak(make(False, "cpu", **args))[0])


if __name__ == "__main__":
    main(sys.argv[1:])
