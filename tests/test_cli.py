import json

import torch

from fastmeta import TaskBatch
from fastmeta._bench import kernels as bench
from fastmeta.cli import main


def test_bench_command_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--workload", "mlp", "--min-time", "0.001", "--rounds", "1", "--json", str(out)]
    maml = ["--maml-workloads", "sinusoid", "--maml-memory", "no"]
    assert main(args + ["--pair-batch", "64", "--all-pairs-sizes", "40"] + maml) == 0
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


def test_bench_maml_rows(capsys):
    from fastmeta._bench import maml as bench_maml

    args = ["bench", "--op", "maml", "--maml-workloads", "sinusoid", "--min-time", "0.001", "--rounds", "1"]
    assert main(args + ["--maml-memory", "no"]) == 0  # the peak-memory probe (a fresh process a row): below, once
    text = capsys.readouterr().out
    for method in ("fastmeta", "loop", "vmap"):
        assert f"| sinusoid MLP 1-40-40-1, K=10+10, T=25, S=5, 2nd order | meta-step | {method} |" in text
    assert main(["bench", "--op", "maml", "--maml-workloads", "omniglot"]) == 2
    second_order = next(w for w in bench_maml.WORKLOADS if w.name == "sinusoid" and not w.first_order)
    assert bench_maml.peak_memory("fastmeta recompute", second_order, "cpu") >= 0


def test_bench_maml_methods_compute_the_same_meta_gradient():
    """The loop and vmap baselines compute maml_step's meta-gradient (else the comparison is void)."""
    from fastmeta._bench import maml as bench_maml

    for w in bench_maml.WORKLOADS:
        grads = {}
        for method in bench_maml.METHODS:
            model, batch, loss_fn = bench_maml.make(w, "cpu", tasks=2)
            model.double()
            batch = batch.to(dtype=torch.float64)
            if w.name == "conv4":  # one query a class (of 15): the same computation, a fifteenth of the work
                batch = TaskBatch(batch.support_x, batch.support_y, batch.query_x[:, ::15], batch.query_y[:, ::15])
            args = (batch, w.inner_lr, w.inner_steps, w.first_order, loss_fn)
            if method == "fastmeta":
                import fastmeta

                loss = fastmeta.maml_step(model, *args).loss
            else:
                loss = {"loop": bench_maml.loop_step, "vmap": bench_maml.vmap_step}[method](model, *args)
            grads[method] = torch.autograd.grad(loss, list(model.parameters()))
        scale = max(g.abs().max() for g in grads["loop"])
        for method in ("fastmeta", "vmap"):
            for a, b in zip(grads[method], grads["loop"]):
                assert (a - b).abs().max() <= 1e-8 * scale, (w.label, method)
