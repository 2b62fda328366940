"""`python -m fastmeta bench`: the kernels (`kernels`) and `maml_step` (`maml`) against what users would write
instead, and peak-memory probes in fresh processes (`memory`). Private: the numbers, not the code, are the
interface (benchmarks/ and benchmarks/RESULTS.md)."""
