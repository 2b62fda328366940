"""`python -m fastmeta bench`: the kernels (`kernels`) and `maml_step` (`maml`) against what users would write
instead, and peak-memory probes in fresh processes (`memory`). Private: the numbers, not the code, are the
interface (benchmarks/ and benchmarks/RESULTS.md)."""


def not_importable(module: str) -> str | None:
    """Why `module` cannot be imported here (a peer library a benchmark compares against), or None."""
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001  (an old peer may fail to import for reasons other than absence)
        return f"{module} not importable: {type(e).__name__}: {e}"
    return None


def small() -> bool:
    """FASTMETA_BENCH_SMALL=1: the pytest-benchmark suites (benchmarks/test_bench_*.py) run every method on toy
    sizes, for checking that they run (`pytest benchmarks --benchmark-disable`, tests/test_readme.py), not for
    timing."""
    import os

    return os.environ.get("FASTMETA_BENCH_SMALL") == "1"
