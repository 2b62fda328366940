"""The pretrained baselines: each task's head fitted in one batched call against Chen et al.'s per-task
fine-tuning with torch.optim; class mini-batches (every example once an epoch, by seed alone, sharded);
Meta-Baseline's centroid logits and its --init; the learners through the command line."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_fewshot_data import make_mini_csv
from test_train import OMNIGLOT, run
from torch import nn
from torch.testing import assert_close

from fastmeta.algorithms import baselines
from fastmeta.algorithms.baselines import CentroidClassifier, CosineLinear, cosine_logits, fit_heads, head_logits
from fastmeta.data import ClassBatches, LabeledBatch, TaskBatch
from fastmeta.train import RunConfig
from fastmeta.train.build import build_model, datasets

D64 = torch.float64


class _CosineHead(nn.Module):
    def __init__(self, weight, norm, scale):
        super().__init__()
        self.weight, self.norm, self.scale = nn.Parameter(weight.clone()), nn.Parameter(norm.clone()), scale

    def forward(self, z):
        return cosine_logits(z, self.weight, self.norm, self.scale)


def per_task_fit(z, y, n_way, kind, epochs, lr, batch_size, scale, seed):
    """Chen et al.'s fine-tuning, one task at a time: a new head, torch.optim.SGD(lr, momentum 0.9, dampening
    0.9, weight decay 1e-3), `epochs` passes over the support set in mini-batches (the same draws)."""
    T, Ns, D = z.shape
    weight, second, orders = baselines._draws(T, n_way, D, Ns, epochs, kind, seed, z)
    heads = []
    for t in range(T):
        if kind == "linear":
            head = nn.Linear(D, n_way).to(D64)
            with torch.no_grad():
                head.weight.copy_(weight[t])
                head.bias.copy_(second[t])
        else:
            head = _CosineHead(weight[t], second[t], scale)
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, dampening=0.9, weight_decay=1e-3)
        for e in range(epochs):
            for lo in range(0, Ns, batch_size):
                pick = orders[e, t, lo : lo + batch_size]
                opt.zero_grad()
                F.cross_entropy(head(z[t, pick]), y[t, pick]).backward()
                opt.step()
        heads.append(head)
    return heads


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("Ns, batch_size", [(5, 4), (7, 4), (3, 8)])
def test_fit_heads_equals_a_per_task_torch_optim_loop(kind, Ns, batch_size):
    """Every task's head, fitted at once, equals fitting each with torch.optim (float64), including a last
    mini-batch smaller than batch_size and a batch larger than the support set; their query logits too."""
    g = torch.Generator().manual_seed(Ns)
    T, n_way, D = 3, 3, 6
    z = torch.randn(T, Ns, D, generator=g, dtype=D64)
    y = torch.randint(0, n_way, (T, Ns), generator=g)
    head = fit_heads(z, y, n_way, kind, epochs=4, lr=0.3, batch_size=batch_size, scale=3.0, seed=5)
    loop = per_task_fit(z, y, n_way, kind, 4, 0.3, batch_size, 3.0, 5)
    q = torch.randn(T, 4, D, generator=g, dtype=D64)
    for t, h in enumerate(loop):
        if kind == "linear":
            assert_close(head[0][t], h.weight.detach(), rtol=1e-12, atol=1e-12)
            assert_close(head[1][t], h.bias.detach(), rtol=1e-12, atol=1e-12)
        else:
            assert_close(head[0][t], h.weight.detach(), rtol=1e-12, atol=1e-12)
            assert_close(head[1][t], h.norm.detach(), rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            assert_close(head_logits(q, head, kind, 3.0)[t], h(q[t]), rtol=1e-12, atol=1e-12)


def test_fit_heads_learns_separable_support_sets_and_is_deterministic():
    """Well-separated classes: after fitting, every task's support and query examples are classified right;
    two calls give the same heads (seeded draws); float32 works; zero epochs leave the initial head."""
    g = torch.Generator().manual_seed(0)
    T, n_way, D = 4, 5, 16
    centres = torch.randn(T, n_way, D, generator=g) * 3
    y = torch.arange(n_way).repeat(2).expand(T, -1)
    z = centres[torch.arange(T).unsqueeze(1), y] + 0.3 * torch.randn(T, 2 * n_way, D, generator=g)
    for kind in ("linear", "cosine"):
        head = fit_heads(z, y, n_way, kind, epochs=30, lr=0.1, scale=10.0)
        assert (head_logits(z, head, kind, 10.0).argmax(-1) == y).all()
        again = fit_heads(z, y, n_way, kind, epochs=30, lr=0.1, scale=10.0)
        assert all(torch.equal(a, b) for a, b in zip(head, again))
    w0, b0, _ = baselines._draws(T, n_way, D, 2 * n_way, 0, "linear", 0, z)
    head = fit_heads(z, y, n_way, "linear", epochs=0)
    assert torch.equal(head[0], w0) and torch.equal(head[1], b0)


def test_fit_heads_bad_input():
    z, y = torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="kind must be one of"):
        fit_heads(z, y, 5, "knn")
    with pytest.raises(ValueError, match=r"support must be \(T, Ns, D\) and labels \(T, Ns\)"):
        fit_heads(z[0], y, 5)
    with pytest.raises(ValueError, match="labels"):
        fit_heads(z, y.float(), 5)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        fit_heads(z, y, 5, batch_size=0)
    with pytest.raises(ValueError, match="epochs must be an integer >= 0"):
        fit_heads(z, y, 5, epochs=-1)


def test_cosine_linear_is_weight_normalised_cosine_similarity():
    torch.manual_seed(0)
    head = CosineLinear(6, 4, scale=2.0).double()
    x = torch.randn(3, 6, dtype=D64)
    v, gnorm = head.weight, head.norm
    expect = 2.0 * F.normalize(x, dim=1) @ (gnorm.unsqueeze(1) * F.normalize(v, dim=1)).T
    assert_close(head(x), expect, rtol=1e-4, atol=1e-5)  # x / (|x| + 1e-5)
    assert_close(gnorm, v.norm(dim=1))  # weight norm starts at the weights' own norms


def class_major(C=5, E=4, sizes=None):
    """(C, E, 2) examples that say what they are: [class, index]; the padding past a class's size is -1."""
    c = torch.arange(C).view(C, 1).expand(C, E)
    e = torch.arange(E).view(1, E).expand(C, E)
    data = torch.stack([c, e], -1).float()
    if sizes is not None:
        for k, n in enumerate(sizes):
            data[k, n:] = -1
    return data


def test_class_batches_visit_every_example_once_an_epoch():
    sizes = [4, 2, 3, 4, 1]
    batches = ClassBatches(class_major(sizes=sizes), batch_size=3, seed=7, class_sizes=sizes)
    assert batches.num_classes == 5 and batches.steps_per_epoch == 14 // 3
    for epoch in range(2):
        seen = []
        for i in range(epoch * 4, epoch * 4 + 4):
            b = batches[i]
            assert isinstance(b, LabeledBatch) and b.x.shape == (3, 2) and b.y.dtype == torch.long
            assert torch.equal(b.x[:, 0].long(), b.y)  # each example with its class
            seen += [tuple(r) for r in b.x.long().tolist()]
        assert len(set(seen)) == 12 and all(e >= 0 for _, e in seen)  # 12 of 14, none twice, no padding
    assert torch.equal(batches[5].x, ClassBatches(class_major(sizes=sizes), 3, 7, class_sizes=sizes)[5].x)
    assert not torch.equal(batches[0].x, batches[4].x)  # another epoch, another order


def test_class_batches_shards_make_the_batch():
    data = class_major(6, 5)
    whole = ClassBatches(data, 7, seed=1)[3]
    shards = [ClassBatches(data, 7, seed=1, shard=(r, 3)) for r in range(3)]
    parts = [s[3] for s in shards]
    assert torch.equal(torch.cat([p.x for p in parts]), whole.x)
    assert [p.x.shape[0] for p in parts] == [2, 2, 3] and math.isclose(sum(s.share for s in shards), 1.0)


def test_class_batches_bad_input():
    with pytest.raises(ValueError, match="batch_size must be an integer in"):
        ClassBatches(class_major(), 0)
    with pytest.raises(ValueError, match="batch_size must be an integer in"):
        ClassBatches(class_major(), 21)
    with pytest.raises(ValueError, match="class-major tensor"):
        ClassBatches(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="class_sizes"):
        ClassBatches(class_major(), 2, class_sizes=[9, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="y"):
        LabeledBatch(torch.zeros(3, 2), torch.zeros(3))


def test_centroid_logits_are_scaled_cosines_to_the_class_means():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    model = CentroidClassifier(body, temperature=7.0).double()
    sx, qx = torch.randn(2, 6, 4, dtype=D64), torch.randn(2, 5, 4, dtype=D64)
    sy = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    batch = TaskBatch(sx, sy, qx, torch.zeros(2, 5, dtype=torch.long))
    logits = baselines.centroid_logits(model, batch, 3, train=False)
    for t in range(2):
        means = torch.stack([body(sx[t][sy[t] == c]).mean(0) for c in range(3)])
        expect = 7.0 * F.normalize(body(qx[t]), dim=1, eps=0) @ F.normalize(means, dim=1).T
        assert_close(logits[t], expect, rtol=1e-5, atol=1e-6)
    logits.sum().backward()
    assert model.temperature.grad is not None and math.isfinite(model.temperature.grad.item())


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"the Omniglot zips are not at {OMNIGLOT}")
def test_pretraining_resumes_exactly_and_metabaseline_starts_from_its_backbone(tmp_path, capsys):
    """A baseline run on class batches: 4 steps equal 2 steps and a resume of 2; its head is over every
    training class; metabaseline --init takes its backbone (and refuses a run without one)."""
    common = ["--dataset", "omniglot", "--data", str(OMNIGLOT), "--hidden", "8", "--val-episodes", "1"]
    common += ["--test-episodes", "0", "--batch-size", "6", "--val-every", "2", "--iterations", "4"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert run(["train", "--algo", "baseline", *common, "--out", str(full)], capsys)[0] == 0
    code, _, err = run(["train", "--algo", "baseline", *common, "--time-limit", "0", "--out", str(half)], capsys)
    assert code == 0 and torch.load(half / "checkpoint.pt", weights_only=False)["iteration"] == 1, err
    code, _, err = run(["train", "--algo", "baseline", *common, "--resume", "--out", str(half)], capsys)
    assert code == 0, err
    a = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(half / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = RunConfig.make("omniglot", algo="baseline", data=str(OMNIGLOT))
    classes = datasets(config, "train").num_classes
    assert a["head.weight"].shape[0] == classes == 4 * 1100  # the Vinyals training characters, rotated

    mb = ["train", "--algo", "metabaseline", "--dataset", "omniglot", "--data", str(OMNIGLOT), "--hidden", "8"]
    mb += ["--iterations", "1", "--meta-batch", "1", "--val-every", "1", "--val-episodes", "1", "--test-episodes", "0"]
    code, _, err = run([*mb, "--init", str(full / "checkpoint.pt"), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    config = RunConfig.make("omniglot", algo="metabaseline", data=str(OMNIGLOT), hidden=8, init=str(full / "best.pt"))
    model, _ = build_model(config)
    config.learner.initialize(config, model, None)
    best = torch.load(full / "best.pt", weights_only=False)["model"]
    m = model.state_dict()
    assert all(torch.equal(m[k], best[k]) for k in best if k.startswith("body."))
    code, stdout, err = run(["eval", str(full / "best.pt"), "--part", "train", "--episodes", "2"], capsys)
    assert code == 0 and "baseline omniglot 5-way 1-shot, train split, 2 tasks" in stdout, err  # episodes
    code, _, err = run([*mb, "--init", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m2")], capsys)
    assert code == 2 and "--init: no checkpoint at" in err
    code, _, err = run(
        [*mb, "--init", str(full / "checkpoint.pt"), "--hidden", "4", "--out", str(tmp_path / "m3")], capsys
    )
    assert code == 2 and "does not fit this run's (--backbone, --hidden and --image-size must match)" in err


@pytest.mark.filterwarnings("ignore:mini-ImageNet in")  # the synthetic copy is a partial one
@pytest.mark.parametrize("backbone", ["conv4", pytest.param("resnet12", marks=pytest.mark.slow)])
def test_baselines_pretrain_on_the_csv_layout_of_mini_imagenet(tmp_path, capsys, monkeypatch, backbone):
    """The natural-image path: class batches of a (synthetic) mini-ImageNet csv copy, normalised, and a
    Baseline++ run with its test through the command line, on either backbone."""
    monkeypatch.setenv("FASTMETA_CACHE", str(tmp_path / "cache"))
    make_mini_csv(tmp_path / "mini", classes=(6, 5, 5), n=6, size=20)
    config = RunConfig.make("miniimagenet", algo="baselinepp", data=str(tmp_path / "mini"), image_size=20)
    batches = datasets(config, "train")
    b = batches[0]
    assert b.x.shape == (16, 3, 20, 20) and batches.num_classes == 6 and set(b.y.tolist()) <= set(range(6))
    assert abs(b.x.mean().item()) < 1.0  # normalised by the train split's statistics
    args = ["train", "--algo", "baselinepp", "--dataset", "miniimagenet", "--data", str(tmp_path / "mini")]
    args += ["--image-size", "20", "--hidden", "8", "--iterations", "2", "--val-every", "2", "--val-episodes", "1"]
    args += ["--test-episodes", "2", "--n-query", "1", "--k-shot", "1", "--augment", "--out", str(tmp_path / "r")]
    args += ["--backbone", backbone, "--batch-size", "4", "--eval-inner-steps", "5"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "test: accuracy" in out
