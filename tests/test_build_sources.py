"""The kernels a test runs are those of the sources it tests: the build records a fingerprint of csrc/, and
importing fastmeta from a source folder whose csrc/ differs warns (an ImportError under
FASTMETA_REQUIRE_KERNELS=1)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastmeta import _kernels
from fastmeta._fingerprint import source_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _tree(tmp_path):
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    (csrc / "fastmeta.cpp").write_text("int a;\n")
    (csrc / "cpu" / "op.cpp").write_text("int b;\n")
    return csrc


def test_fingerprint_follows_source_contents_and_names(tmp_path):
    csrc = _tree(tmp_path)
    first = source_fingerprint(csrc)
    assert source_fingerprint(csrc) == first
    (csrc / "notes.txt").write_text("not a source")  # only C++/CUDA files count
    assert source_fingerprint(csrc) == first
    (csrc / "cpu" / "op.cpp").write_text("int b; \n")
    changed = source_fingerprint(csrc)
    assert changed != first
    (csrc / "cpu" / "op.cpp").rename(csrc / "cpu" / "op2.cpp")
    assert source_fingerprint(csrc) != changed
    (csrc / "cuda").mkdir()
    (csrc / "cuda" / "k.cuh").write_text("")
    assert len({first, changed, source_fingerprint(csrc)}) == 3


def test_stale_sources(tmp_path):
    csrc = _tree(tmp_path)
    assert _kernels.stale_sources(source_fingerprint(csrc), str(csrc)) is None
    assert _kernels.stale_sources(None, str(tmp_path / "absent")) is None  # an installed package: nothing beside
    why = _kernels.stale_sources("0" * 64, str(csrc))
    assert why is not None and str(csrc) in why
    assert _kernels.stale_sources(None, str(csrc)) is not None  # a build from before fingerprints


def test_this_checkout_runs_its_own_kernels():
    import fastmeta

    if not fastmeta.kernels_available():
        pytest.skip("kernels not built")
    assert fastmeta.kernels_info()["stale"] is None


def _import_copy(tmp_path, edit: bool, require: bool) -> subprocess.CompletedProcess:
    """Import fastmeta from a copy of this source folder (its package and csrc/), csrc/ edited or not."""
    shutil.copytree(ROOT / "fastmeta", tmp_path / "fastmeta", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    if edit:
        with open(tmp_path / "csrc" / "fastmeta.cpp", "a") as f:
            f.write("// an edit that was not built\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMETA_")}
    env.update(PYTHONPATH=str(tmp_path), **({"FASTMETA_REQUIRE_KERNELS": "1"} if require else {}))
    code = "import fastmeta; print(fastmeta.kernels_info())"
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )


def test_edited_sources_warn_with_the_rebuild_command(tmp_path):
    import fastmeta

    if not fastmeta.kernels_available():
        pytest.skip("kernels not built")
    clean = _import_copy(tmp_path / "clean", edit=False, require=True)
    assert clean.returncode == 0 and "built from other sources" not in clean.stderr, clean.stderr
    warned = _import_copy(tmp_path / "warn", edit=True, require=False)
    assert warned.returncode == 0, warned.stderr
    assert "fastmeta's kernels were built from other sources than" in warned.stderr
    assert "rebuild them with" in warned.stderr
    assert warned.stderr.count("built from other sources") == 1  # once, not per op
    refused = _import_copy(tmp_path / "refuse", edit=True, require=True)
    assert refused.returncode != 0
    assert "ImportError" in refused.stderr and "FASTMETA_REQUIRE_KERNELS=1" in refused.stderr
