"""The CUDA kernels' launch tables (csrc/cuda/multi_tensor_apply.cuh), checked on the host: the table builder is
plain C++, compiled here with the system compiler, so this runs on machines without a GPU too. Every chunk of
every tensor goes to exactly one block, in order, and no launch holds more tensors or blocks than its table."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(36, 320), (24, 320), (3, 5), (1, 1), (2, 7)]  # (max tensors, max blocks) the harness instantiates


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("chunk_tables") / "chunk_tables"
    includes = [f"-I{p}" for p in cpp.include_paths()] + [f"-I{ROOT / 'csrc' / 'cuda'}"]
    lib = Path(cpp.TORCH_LIB_PATH)
    cmd = [cxx, "-O1", "-std=c++17", *includes, str(ROOT / "tests/fixtures/cpp/chunk_tables.cpp"),
           f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}", "-o", str(exe)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def launches(harness: Path, cases: list[tuple[int, int, list[int]]]) -> list[list[list[tuple[int, int]]]]:
    """Per case, its launches: per launch, (tensor, chunk) of each block."""
    text = "".join(f"{t} {b} {' '.join(map(str, chunks))}\n" for t, b, chunks in cases)
    out = subprocess.run([str(harness)], input=text, check=True, capture_output=True, text=True).stdout
    result, current = [], []
    for line in out.splitlines():
        if line == "END":
            result.append(current)
            current = []
        else:
            current.append([tuple(map(int, block.split(":"))) for block in line.split()[1:]])
    return result


def test_every_chunk_once_within_the_table_limits(harness):
    rng = random.Random(0)
    cases = []
    for max_tensors, max_blocks in CONFIGS:
        cases += [
            (max_tensors, max_blocks, []),
            (max_tensors, max_blocks, [0, 0, 0]),
            (max_tensors, max_blocks, [1] * 100),  # many small tensors: a launch per table of tensors
            (max_tensors, max_blocks, [max_blocks * 3 + 1]),  # one tensor over several launches
            (max_tensors, max_blocks, [max_blocks, 0, max_blocks - 1 or 1, 1]),
        ]
        for _ in range(20):
            n = rng.randint(1, 80)
            cases.append(
                (max_tensors, max_blocks, [rng.choice([0, 1, 2, rng.randint(1, 3 * max_blocks)]) for _ in range(n)])
            )
    for (max_tensors, max_blocks, chunks), got in zip(cases, launches(harness, cases), strict=True):
        blocks = [block for launch in got for block in launch]
        assert blocks == [(i, c) for i, n in enumerate(chunks) for c in range(n)]  # each once, in order
        for launch in got:
            assert 0 < len(launch) <= max_blocks
            assert len({i for i, _ in launch}) <= max_tensors
        # A launch is cut only when its table is full (of blocks, or of tensors whose chunks all fit).
        for launch in got[:-1]:
            assert len(launch) == max_blocks or len({i for i, _ in launch}) == max_tensors
