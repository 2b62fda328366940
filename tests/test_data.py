"""fastmeta.data (episodes, sinusoid, Omniglot), fastmeta.models and reptile_step."""

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.testing import assert_close

import fastmeta
from fastmeta.data import EpisodeSampler, SinusoidTasks, load_omniglot, omniglot_split
from fastmeta.models import MLP, Conv4, from_config

SHARED_OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
OMNIGLOT = Path(os.environ.get("FASTMETA_OMNIGLOT", SHARED_OMNIGLOT))


def class_major(C=7, E=6, shape=(1, 4, 4)):
    """Example e of class c is filled with the value 10*c + e, so every image says where it came from."""
    x = torch.arange(C).view(C, 1) * 10 + torch.arange(E).view(1, E)
    return x.view(C, E, *([1] * len(shape))).expand(C, E, *shape).to(torch.uint8).contiguous()


def test_episodes_shapes_labels_and_distinct_draws():
    data = class_major()
    s = EpisodeSampler(data, n_way=3, k_shot=2, n_query=3, tasks=4, seed=1)
    b = s[5]
    assert b.support_x.shape == (4, 6, 1, 4, 4) and b.query_x.shape == (4, 9, 1, 4, 4)
    assert b.support_x.dtype == torch.float32 and b.support_x.max() <= 1
    assert torch.equal(b.support_y[0], torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(b.query_y[0], torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    ids = lambda x: (x[..., 0, 0, 0] * 255).round().long()  # noqa: E731
    for t in range(4):
        s_ids, q_ids = ids(b.support_x[t]), ids(b.query_x[t])
        s_class, q_class = s_ids // 10, q_ids // 10
        assert len(set(s_class.tolist())) == 3  # three distinct classes ...
        for label in range(3):  # ... each with one label, the same in support and query
            cls = s_class[b.support_y[t] == label]
            assert (cls == cls[0]).all() and (q_class[b.query_y[t] == label] == cls[0]).all()
        assert len(set(s_ids.tolist()) | set(q_ids.tolist())) == 15  # no example twice in a task


def test_episodes_are_reproducible_and_worker_independent():
    data = class_major(C=12, E=8)
    s = EpisodeSampler(data, n_way=4, k_shot=1, n_query=2, tasks=2, seed=3, length=6)
    again = EpisodeSampler(data, n_way=4, k_shot=1, n_query=2, tasks=2, seed=3, length=6)
    assert torch.equal(s[4].support_x, again[4].support_x)
    assert not torch.equal(s[4].support_x, s[5].support_x)
    other = EpisodeSampler(data, n_way=4, k_shot=1, n_query=2, tasks=2, seed=4)
    assert not torch.equal(s[4].support_x, other[4].support_x)
    loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=2)
    for i, b in enumerate(loader):
        assert isinstance(b, fastmeta.TaskBatch)
        assert torch.equal(b.query_x, s[i].query_x) and torch.equal(b.support_y, s[i].support_y)
    assert i == 5


def test_episodes_from_any_labelled_dataset():
    xs = torch.randn(30, 2)
    labels = torch.arange(30) % 5
    dataset = torch.utils.data.TensorDataset(xs, labels)
    s = EpisodeSampler(dataset, n_way=3, k_shot=2, n_query=1, tasks=3)
    b = s[0]
    assert b.support_x.shape == (3, 6, 2) and b.query_x.shape == (3, 3, 2)
    for t in range(3):  # each episode's examples really are of the classes their labels stand for
        rows = [int((xs == v).all(1).nonzero()) for v in b.support_x[t]]
        classes = labels[rows].view(3, 2)
        assert (classes == classes[:, :1]).all() and len(set(classes[:, 0].tolist())) == 3


def test_episode_errors():
    data = class_major(C=4, E=5)
    with pytest.raises(ValueError, match="n_way=5 is more than the 4 classes"):
        EpisodeSampler(data, n_way=5, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="k_shot \\+ n_query = 6 examples per class, but only 0 classes"):
        EpisodeSampler(data, n_way=2, k_shot=1, n_query=5)
    with pytest.raises(ValueError, match="k_shot must be an integer >= 1, got 0"):
        EpisodeSampler(data, n_way=2, k_shot=0, n_query=1)


def test_sinusoid_tasks():
    s = SinusoidTasks(k_shot=10, n_query=7, tasks=50, seed=0)
    b, amp, phase = s.sample(3)
    assert b.support_x.shape == (50, 10, 1) and b.query_y.shape == (50, 7, 1)
    assert (amp >= 0.1).all() and (amp <= 5).all() and (phase >= 0).all() and (phase <= torch.pi).all()
    assert (b.support_x.abs() <= 5).all()
    assert_close(b.support_y, amp.view(-1, 1, 1) * torch.sin(b.support_x - phase.view(-1, 1, 1)))
    assert torch.equal(s[3].query_x, b.query_x) and not torch.equal(s[4].query_x, b.query_x)


def test_models():
    m = Conv4(n_way=5)
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 5)
    assert [n for n, _ in m.named_children()] == ["features", "head"]
    assert Conv4(n_way=20, hidden=32, image_size=84)(torch.rand(2, 1, 84, 84)).shape == (2, 20)
    assert MLP((1, 40, 40, 1))(torch.rand(4, 1)).shape == (4, 1)
    assert type(from_config(m.config)) is Conv4 and from_config(m.config).config == m.config
    with pytest.raises(ValueError, match="image_size must be at least 16"):
        Conv4(image_size=8)
    with pytest.raises(ValueError, match="unknown model 'ResNet'"):
        from_config({"model": "ResNet"})
    from fastmeta.algorithms import _batched

    assert _batched.BatchedModel.supports(m) is None and _batched.BatchedModel.supports(MLP()) is None


def test_reptile_step_writes_the_reptile_direction():
    torch.manual_seed(0)
    model = Conv4(n_way=3, hidden=4, image_size=16).double()
    b = EpisodeSampler(torch.rand(6, 4, 1, 16, 16, dtype=torch.float64), 3, 1, 2, tasks=3)[0]
    out = fastmeta.reptile_step(model, b, inner_lr=0.3, inner_steps=2)
    for name, p in model.named_parameters():
        fast = []
        for t in range(3):
            w = dict(model.named_parameters())
            for _ in range(2):
                loss = F.cross_entropy(functional_call(model, w, (b.support_x[t],)), b.support_y[t])
                g = torch.autograd.grad(loss, list(w.values()))
                w = {n: v - 0.3 * gi for (n, v), gi in zip(w.items(), g)}
            fast.append(w[name].detach())
        assert_close(p.grad, p.detach() - torch.stack(fast).mean(0), rtol=1e-9, atol=1e-12)
    assert out.task_losses.shape == (3,) and out.accuracy.shape == (3,) and out.support_losses.shape == (3, 2)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    fastmeta.reptile_step(model, b, inner_lr=0.3, inner_steps=2)  # accumulates like backward()
    for n, p in model.named_parameters():
        assert_close(p.grad, 2 * grads[n])


def _fake_omniglot(root: Path, zipped: bool) -> None:
    """A tiny Omniglot in the release layout: 2 alphabets x 2 characters per set, 20 drawings of 105x105."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in ("images_background", "images_evaluation"):
        files = {}
        for a in ("Alpha", "Beta"):
            for c in ("character01", "character02"):
                for d in range(20):
                    img = Image.fromarray((rng.random((105, 105)) > 0.1).astype(np.uint8) * 255).convert("1")
                    path = f"{s}/{a}/{c}/{d:04d}_{d + 1:02d}.png"
                    if zipped:
                        import io

                        buf = io.BytesIO()
                        img.save(buf, format="PNG")
                        files[path] = buf.getvalue()
                    else:
                        (root / "omniglot-py" / path).parent.mkdir(parents=True, exist_ok=True)
                        img.save(root / "omniglot-py" / path)
        if zipped:
            root.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(root / f"{s}.zip", "w") as z:
                for path, data in files.items():
                    z.writestr(path, data)


@pytest.mark.parametrize("zipped", [False, True], ids=["torchvision-folder", "zips"])
def test_omniglot_reads_folders_and_zips(tmp_path, zipped):
    _fake_omniglot(tmp_path / "data", zipped)
    data = load_omniglot(tmp_path / "data", image_size=28, cache_dir=tmp_path / "cache")
    assert data.images.shape == (8, 20, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.names[0] == "images_background/Alpha/character01" and data.names[-1].startswith("images_evaluation/")
    assert 0 < data.images.float().mean() < 255 * 0.3  # ink (10% of pixels) is high, paper 0
    cached = load_omniglot(tmp_path / "data", image_size=28, cache_dir=tmp_path / "cache")
    assert torch.equal(cached.images, data.images) and len(list((tmp_path / "cache").glob("*.pt"))) == 1


def _png_bytes() -> bytes:
    """A real 105x105 black-and-white PNG, as the Omniglot files are."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((105, 105)) > 0.1).astype(np.uint8) * 255).convert("1").save(
        buf, format="PNG"
    )
    return buf.getvalue()


def test_omniglot_zip_member_in_an_unsupported_compression_is_named(tmp_path):
    """A member compressed with a method zipfile cannot read (Deflate64, as 7-Zip may write): a ValueError naming
    the member and its zip and what to do, not zipfile's NotImplementedError; nothing cached."""
    _fake_omniglot(tmp_path / "data", zipped=True)
    path = tmp_path / "data" / "images_background.zip"
    member = "images_background/Alpha/character01/0001_02.png"
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")  # the central directory: mark the member's method as Deflate64 (9)
    while at >= 0:
        name_len = int.from_bytes(raw[at + 28 : at + 30], "little")
        if raw[at + 46 : at + 46 + name_len].decode() == member:
            raw[at + 10 : at + 12] = (9).to_bytes(2, "little")
        at = raw.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"^{re.escape(member)} in {re.escape(str(path))} uses a compression method "):
        load_omniglot(tmp_path / "data", image_size=28, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-an-image"])
@pytest.mark.parametrize("zipped", [False, True], ids=["torchvision-folder", "zips"])
def test_omniglot_corrupt_png_is_named_and_nothing_cached(tmp_path, zipped, damage):
    """A PNG that does not decode, inside a valid zip or in the extracted folders: a ValueError naming the file
    (the member and its zip) and what is wrong, not Pillow's traceback, and no cache file."""
    _fake_omniglot(tmp_path / "data", zipped)
    member = "images_evaluation/Beta/character02/0007_08.png"  # the second set: the first decoded already
    bad = {
        "garbage": b"\x89PNG\r\n\x1a\n" + b"garbage" * 8,  # a PNG signature, then nothing of a PNG
        "truncated": _png_bytes()[:300],  # a real PNG cut short
        "not-an-image": b"<html>404</html>",  # what Pillow cannot identify
    }[damage]
    if zipped:
        path = tmp_path / "data" / "images_evaluation.zip"
        with zipfile.ZipFile(path) as z:
            files = {info.filename: z.read(info) for info in z.infolist()}
        files[member] = bad
        with zipfile.ZipFile(path, "w") as z:  # a valid zip, one member of which is not a readable PNG
            for name, content in files.items():
                z.writestr(name, content)
        where = f"{member} in {path}"
    else:
        path = tmp_path / "data" / "omniglot-py" / member
        path.write_bytes(bad)
        where = str(path)
    why = {"garbage": ".+", "truncated": ".*truncated", "not-an-image": "not an image Pillow can identify"}[damage]
    with pytest.raises(ValueError, match=f"^cannot decode image {re.escape(where)} \\({why}\\): "):
        load_omniglot(tmp_path / "data", image_size=28, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no file, no temporary


def test_omniglot_missing_folder_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="Omniglot not found under .*omniglot-py/images_background.*download"):
        load_omniglot(tmp_path / "nowhere")


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"the Omniglot zips are not at {OMNIGLOT}")
def test_real_omniglot_splits(tmp_path_factory):
    cache = os.environ.get("FASTMETA_CACHE") or tmp_path_factory.getbasetemp() / "cache"
    data = load_omniglot(OMNIGLOT, cache_dir=cache)
    assert data.images.shape == (1623, 20, 1, 28, 28)
    assert sum(n.startswith("images_background/") for n in data.names) == 964
    sizes = {part: len(omniglot_split(data, "vinyals", part)) for part in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 4400, "val": 400, "trainval": 4800, "test": 1692}
    assert len(omniglot_split(data, "lake", "test")) == 659
    test = omniglot_split(data, "vinyals", "test")
    assert torch.equal(test[1], torch.rot90(test[0], 1, dims=(-2, -1)))  # the four rotations of one character
    b = EpisodeSampler(test, n_way=20, k_shot=1, n_query=5, tasks=2)[0]
    assert b.support_x.shape == (2, 20, 1, 28, 28)
