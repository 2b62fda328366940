import json

import torch

from fastmeta import bench
from fastmeta.cli import main


def test_bench_command_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--workload", "mlp", "--min-time", "0.001", "--rounds", "1", "--json", str(out)]
    assert main(args + ["--pair-batch", "64", "--all-pairs-sizes", "40"]) == 0
    text = capsys.readouterr().out
    assert "| mlp T=25 shared params, scalar lr | forward | fastmeta |" in text
    rows = json.loads(out.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"fastmeta", "reference", "loop", "foreach", "flat"} <= methods
    assert all(r["seconds"] > 0 for r in rows)
    assert "| pair mode B=64 D=128 | forward+backward | torch.compile(reference) |" in text
    all_pairs = [r for r in rows if r["workload"].startswith("all pairs N=40")]
    assert {r["method"] for r in all_pairs} == {"fastmeta", "reference"}
    assert all(r["peak_bytes"] >= 0 for r in all_pairs)


def test_bench_methods_compute_the_same_update():
    """Every alternative in the benchmark computes the same thing as fastmeta (else the comparison is void)."""
    for w in bench.WORKLOADS:
        x = bench.make_inputs(w, "cpu", requires_grad=False)
        fns = bench.methods(w, x)
        ours = fns.pop("fastmeta")()
        flat_ours = [o.reshape(w.tasks, -1) for o in ours]
        for name, fn in fns.items():
            got = fn()
            if name == "flat":
                got_flat = got[0].reshape(w.tasks, -1)
                want = torch.cat(flat_ours, dim=1)
                assert (got_flat - want).abs().max() < 1e-5, name
            else:
                for a, b in zip(got, ours):
                    assert (a - b).abs().max() < 1e-5, name
