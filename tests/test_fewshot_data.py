"""fastmeta.data.fewshot: every distributed layout written in miniature (real PNG, JPEG and pickle files of random
pixels) and read back: classes, counts, pixels, the cache, episodes, normalisation, augmentation and the errors."""

import os
import pickle
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fastmeta.data import EpisodeSampler, decoding, load_fewshot

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMETA_CACHE", str(tmp_path / "cache"))


def pixels(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_images(folder, n, size=(16, 16), ext="png"):
    """n images of random pixels in `folder`, named 000.<ext>...; returns their arrays (as written for PNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(n):
        a = pixels(size[1], size[0])
        Image.fromarray(a).save(folder / f"{i:03d}.{ext}", quality=95)
        arrays.append(a)
    return arrays


def chw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def make_folder(root, counts=None, size=(16, 16)):
    """root/{train,val,test}/<class>/*.png; counts: {part: [images per class]}."""
    counts = counts or {"train": [5, 3, 5], "val": [4, 4], "test": [4, 4]}
    return {
        part: {f"{part}{c}": write_images(root / part / f"{part}{c}", n, size) for c, n in enumerate(ns)}
        for part, ns in counts.items()
    }


def test_folder_layout_classes_counts_pixels_and_cache(tmp_path):
    written = make_folder(tmp_path / "ds")
    data = load_fewshot("folder", tmp_path / "ds", image_size=16, progress=False)
    assert data.layout == "folder" and data.image_size == 16
    assert [len(data.splits[p]) for p in ("train", "val", "test")] == [3, 2, 2]
    train = data.splits["train"]
    assert train.classes == ["train0", "train1", "train2"]
    assert train.counts.tolist() == [5, 3, 5] and train.images.shape == (3, 5, 3, 16, 16)
    assert train.images.dtype == torch.uint8
    for c, name in enumerate(train.classes):
        for e, a in enumerate(written["train"][name]):  # PNG: exact
            assert torch.equal(train.images[c, e], chw(a))
    assert not train.images[1, 3:].any()  # padding past the count
    # mean and std: of the train split's valid images only
    valid = torch.cat([train.images[c, :n] for c, n in enumerate(train.counts.tolist())]).double() / 255
    assert np.allclose(data.mean, valid.mean((0, 2, 3)).tolist())
    assert np.allclose(data.std, valid.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False).tolist())
    # the second load: from the cache, the same pixels; the folder that holds the dataset works too
    again = load_fewshot("folder", tmp_path, image_size=16, progress=False)
    assert again.cache_file == data.cache_file and os.path.isfile(data.cache_file)
    assert data.cache_file.startswith(str(tmp_path / "cache"))
    for p in ("train", "val", "test"):
        assert torch.equal(again.splits[p].images, data.splits[p].images)
        assert again.splits[p].classes == data.splits[p].classes
    assert data.part("trainval").counts.tolist() == [5, 3, 5, 4, 4]


def test_resize_modes(tmp_path):
    """crop: shorter side to the size, then the centre square (torchvision's Resize + CenterCrop); square: the
    whole image to size x size."""
    a = write_images(tmp_path / "ds" / "train" / "x", 1, size=(40, 20))[0]  # 40 wide, 20 high
    for p in ("val", "test"):
        write_images(tmp_path / "ds" / p / "x", 1, size=(40, 20))
    im = Image.fromarray(a)
    crop = np.asarray(im.resize((20, 10), Image.LANCZOS).crop((5, 0, 15, 10)))
    square = np.asarray(im.resize((10, 10), Image.LANCZOS))
    assert torch.equal(
        load_fewshot("folder", tmp_path / "ds", 10, progress=False).splits["train"].images[0, 0], chw(crop)
    )
    got = load_fewshot("folder", tmp_path / "ds", 10, resize="square", progress=False).splits["train"].images[0, 0]
    assert torch.equal(got, chw(square))


def make_mini_csv(root, classes=(4, 2, 2), n=6, size=20):
    (root / "images").mkdir(parents=True)
    arrays = {}
    for part, C in zip(("train", "val", "test"), classes):
        lines = ["filename,label"]
        for c in range(C):
            label = f"n{part}{c:02d}"
            for e in range(n):
                name = f"{label}{e:08d}.jpg"
                a = pixels(size, size)
                Image.fromarray(a).save(root / "images" / name, quality=90)
                lines.append(f"{name},{label}")
                arrays[name] = a
        (root / f"{part}.csv").write_text("\n".join(lines) + "\n")
    return arrays


def test_miniimagenet_csv_layout(tmp_path):
    make_mini_csv(tmp_path / "mini")
    data = load_fewshot("miniimagenet", tmp_path / "mini", image_size=20, progress=False)
    assert data.layout == "csv"
    assert [len(data.splits[p]) for p in ("train", "val", "test")] == [4, 2, 2]
    val = data.splits["val"]
    assert val.classes == ["nval00", "nval01"] and val.counts.tolist() == [6, 6]
    for e in range(6):  # JPEG: the same pixels as PIL's own decode
        with Image.open(tmp_path / "mini" / "images" / f"nval01{e:08d}.jpg") as im:
            assert torch.equal(val.images[1, e], chw(np.asarray(im.convert("RGB"))))
    assert data.augment_padding == 2  # 8 at 84, scaled


def test_miniimagenet_csv_over_class_folders_of_another_split(tmp_path):
    """The csv files decide the parts, wherever the images are: in images/<class>/ or in folders of a mirror's own
    split (train/<class>/, val/<class>/), found by file name without copying anything; the same pixels as the flat
    images/ folder."""
    arrays = make_mini_csv(tmp_path / "flat", classes=(3, 2, 2), n=4, size=12)
    flat = load_fewshot("miniimagenet", tmp_path / "flat", image_size=12, progress=False)
    for copy, folder_of in (("nested", lambda n, i: f"images/{n[:7]}"), ("mirror", lambda n, i: f"{'ab'[i % 2]}/x")):
        root = tmp_path / copy
        root.mkdir()
        for part in ("train", "val", "test"):
            shutil.copy(tmp_path / "flat" / f"{part}.csv", root / f"{part}.csv")
        for i, name in enumerate(sorted(arrays)):  # the mirror mixes every part's images in its two folders
            (root / folder_of(name, i)).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "flat" / "images" / name, root / folder_of(name, i) / name)
        data = load_fewshot("miniimagenet", root, image_size=12, progress=False)
        assert data.layout == "csv"
        for p in ("train", "val", "test"):
            assert data.splits[p].classes == flat.splits[p].classes
            assert torch.equal(data.splits[p].images, flat.splits[p].images)


def test_miniimagenet_csv_errors_name_the_first_missing_or_repeated_file(tmp_path):
    make_mini_csv(tmp_path / "mini", classes=(2, 1, 1), n=2, size=8)
    root = tmp_path / "mini"
    for name in ("ntrain0000000000.jpg", "ntest0000000001.jpg"):
        (root / "images" / name).unlink()
    with pytest.raises(FileNotFoundError, match="2 of the 8 files listed in train/val/test.csv are not under "
                       ".*mini/images; the first: ntrain0000000000.jpg \\(train.csv\\)$"):  # fmt: skip
        load_fewshot("miniimagenet", root, progress=False)
    make_mini_csv(tmp_path / "again", classes=(2, 1, 1), n=2, size=8)
    root = tmp_path / "again"
    with open(root / "test.csv", "a") as f:
        f.write("nval0000000001.jpg,nval00\n")
    with pytest.raises(ValueError, match="1 file\\(s\\) listed twice .* \\(the first: nval0000000001.jpg, in "
                       "val.csv and test.csv\\)"):  # fmt: skip
        load_fewshot("miniimagenet", root, progress=False)
    # the same name in two folders: which image is meant is not known
    (root / "test.csv").write_text("filename,label\nntest0000000000.jpg,ntest00\nntest0000000001.jpg,ntest00\n")
    (root / "images" / "copy").mkdir()
    shutil.copy(root / "images" / "ntest0000000000.jpg", root / "images" / "copy")
    with pytest.raises(ValueError, match="1 listed file name\\(s\\) are found at several places .* the first: "
                       "ntest0000000000.jpg at "):  # fmt: skip
        load_fewshot("miniimagenet", root, progress=False)


def test_a_partial_copy_warns_with_the_published_split(tmp_path):
    make_cub(tmp_path, counts=(2,) * 8, size=(8, 8))
    with pytest.warns(UserWarning, match="CUB-200-2011 in .* has 4/2/2 train/val/test classes, but the split "
                      "papers report has 100/50/50"):  # fmt: skip
        load_fewshot("cub", tmp_path, image_size=8, progress=False)


def test_cub_with_or_without_its_metadata_files(tmp_path):
    """Caltech's archive has images.txt, classes.txt, ... beside images/; mirrors often only images/."""
    make_cub(tmp_path / "bare", counts=(2,) * 8, size=(8, 8))
    shutil.copytree(tmp_path / "bare", tmp_path / "full")
    full = tmp_path / "full" / "CUB_200_2011"
    (full / "classes.txt").write_text("".join(f"{i + 1} {i + 1:03d}.Bird_{i}\n" for i in range(8)))
    (full / "images.txt").write_text("1 001.Bird_0/000.jpg\n")
    (full / "train_test_split.txt").write_text("1 1\n")
    (full / "attributes").mkdir()
    with pytest.warns(UserWarning):
        bare = load_fewshot("cub", tmp_path / "bare", image_size=8, progress=False)
        data = load_fewshot("cub", tmp_path / "full", image_size=8, progress=False)
    for p in ("train", "val", "test"):
        assert data.splits[p].classes == bare.splits[p].classes
        assert torch.equal(data.splits[p].images, bare.splits[p].images)


@pytest.mark.parametrize("where", ["splits/bertinetto", ".", "data"])
def test_cifarfs_split_files_beside_or_inside_data(tmp_path, where):
    names = make_cifarfs(tmp_path / "fs", classes=(2, 1, 1), n=2)
    if where != "splits/bertinetto":
        for part in ("train", "val", "test"):
            os.replace(
                tmp_path / "fs" / "splits" / "bertinetto" / f"{part}.txt", tmp_path / "fs" / where / f"{part}.txt"
            )
        shutil.rmtree(tmp_path / "fs" / "splits")
    data = load_fewshot("cifarfs", tmp_path / "fs", progress=False)
    assert [data.splits[p].classes for p in ("train", "val", "test")] == [names[p] for p in ("train", "val", "test")]


def make_mini_pickles(root, classes=(4, 2, 2), n=6, size=12):
    root.mkdir(parents=True)
    out = {}
    for part, C in zip(("train", "validation", "test"), classes):
        images = RNG.integers(0, 256, (C * n, size, size, 3), dtype=np.uint8)
        order = RNG.permutation(C * n)  # a class's images need not be contiguous
        class_dict = {f"n{part}{c:02d}": order[c * n : (c + 1) * n].tolist() for c in range(C)}
        with open(root / f"mini-imagenet-cache-{part}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
        out[part] = (images, class_dict)
    return out


def test_miniimagenet_pickle_layout(tmp_path):
    written = make_mini_pickles(tmp_path / "mini")
    data = load_fewshot("miniimagenet", tmp_path, image_size=12, progress=False)
    assert data.layout == "pickle" and [len(data.splits[p]) for p in ("train", "val", "test")] == [4, 2, 2]
    images, class_dict = written["validation"]
    val = data.splits["val"]
    assert val.classes == sorted(class_dict)
    for c, name in enumerate(val.classes):
        for e, i in enumerate(class_dict[name]):
            assert torch.equal(val.images[c, e], chw(images[i]))
    small = load_fewshot("miniimagenet", tmp_path / "mini", image_size=8, progress=False)
    assert small.splits["train"].images.shape == (4, 6, 3, 8, 8)  # resized from 12


def test_pickles_that_name_code_are_refused(tmp_path):
    make_mini_pickles(tmp_path / "mini")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "mini" / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": Evil()}, f)
    with pytest.raises(ValueError, match="mini-imagenet-cache-test.pkl: not a readable dataset pickle.*system"):
        load_fewshot("miniimagenet", tmp_path / "mini", progress=False)


def make_cifarfs(root, classes=(4, 2, 2), n=5):
    names = {}
    for part, C in zip(("train", "val", "test"), classes):
        names[part] = [f"{part}_class_{c}" for c in range(C)]
        for name in names[part]:
            write_images(root / "data" / name, n, size=(32, 32))
    (root / "splits" / "bertinetto").mkdir(parents=True)
    for part, ns in names.items():
        (root / "splits" / "bertinetto" / f"{part}.txt").write_text("\n".join(ns) + "\n")
    return names


def test_cifarfs_layout(tmp_path):
    names = make_cifarfs(tmp_path / "cifar100")
    data = load_fewshot("cifarfs", tmp_path, progress=False)  # the folder that holds it
    assert data.image_size == 32 and data.layout == "bertinetto"
    for p in ("train", "val", "test"):
        assert data.splits[p].classes == names[p] and data.splits[p].counts.tolist() == [5] * len(names[p])
    with Image.open(tmp_path / "cifar100" / "data" / "test_class_1" / "003.png") as im:
        assert torch.equal(data.splits["test"].images[1, 3], chw(np.asarray(im)))


def make_cifar100(root, train_per_class=2, test_per_class=1):
    """cifar-100-python/{train,test,meta} as the real files: Python-2-style pickles with bytes keys, data
    (N, 3072) uint8 rows of R, G, B planes; fine class f belongs to superclass f % 20."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, n in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), n)
        RNG.shuffle(fine)
        data = RNG.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        d = {b"filenames": [b"x.png"] * len(fine), b"fine_labels": fine.tolist(),
             b"coarse_labels": (fine % 20).tolist(), b"data": data}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        written[name] = (data, fine)
    meta = {b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]}  # fmt: skip
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


def test_fc100_layout(tmp_path):
    written = make_cifar100(tmp_path)
    data = load_fewshot("fc100", tmp_path, progress=False)
    assert [len(data.splits[p]) for p in ("train", "val", "test")] == [60, 20, 20]
    assert all((data.splits[p].counts == 3).all() for p in ("train", "val", "test"))  # the train and test pickles
    test = data.splits["test"]
    assert {int(c[4:]) % 20 for c in test.classes} == {0, 7, 12, 14}
    assert {int(c[4:]) % 20 for c in data.splits["val"].classes} == {8, 11, 13, 16}
    c = test.classes.index("fine27")  # superclass 7: train images first, then test
    (train_x, train_y), (test_x, test_y) = written["train"], written["test"]
    expected = [*train_x[train_y == 27], *test_x[test_y == 27]]
    for e, row in enumerate(expected):
        assert torch.equal(test.images[c, e], torch.from_numpy(row.reshape(3, 32, 32)))
    top = load_fewshot("fc100", tmp_path / "cifar-100-python", progress=False)  # the top folder itself
    assert top.splits["test"].classes == test.classes and torch.equal(top.splits["test"].images, test.images)


def make_cub(root, counts=(5, 6, 4, 5, 6, 5, 4, 6), size=(30, 24)):
    for i, n in enumerate(counts):
        write_images(root / "CUB_200_2011" / "images" / f"{i + 1:03d}.Bird_{i}", n, size=size, ext="jpg")


def test_cub_layout_unequal_counts_and_episodes(tmp_path):
    make_cub(tmp_path)
    data = load_fewshot("cub", tmp_path, image_size=16, progress=False)
    assert data.splits["train"].classes == ["001.Bird_0", "003.Bird_2", "005.Bird_4", "007.Bird_6"]
    assert data.splits["val"].classes == ["002.Bird_1", "006.Bird_5"]
    assert data.splits["test"].classes == ["004.Bird_3", "008.Bird_7"]
    train = data.splits["train"]
    assert train.counts.tolist() == [5, 4, 6, 4] and train.images.shape == (4, 6, 3, 16, 16)
    # 2-way 1-shot 3 queries from classes of 4 to 6: only valid images, never the zero padding
    episodes = data.episodes("train", n_way=2, k_shot=1, n_query=3, tasks=3, seed=0)
    padding = (torch.zeros(3, 1, 1) - torch.tensor(data.mean).view(3, 1, 1)) / torch.tensor(data.std).view(3, 1, 1)
    for i in range(30):
        b = episodes[i]
        x = torch.cat([b.support_x, b.query_x], 1)
        assert not torch.isclose(x, padding.expand_as(x[0, 0])).flatten(2).all(2).any()
    with pytest.raises(ValueError, match="class '003.Bird_2' has 4 images, fewer than k_shot \\+ n_query = 5"):
        data.episodes("train", n_way=2, k_shot=1, n_query=4)


def test_episodes_shapes_normalisation_and_augmentation(tmp_path):
    make_folder(tmp_path, {"train": [6] * 4, "val": [6] * 3, "test": [6] * 3})
    data = load_fewshot("folder", tmp_path, image_size=16, progress=False)
    plain = data.episodes("train", n_way=3, k_shot=2, n_query=2, tasks=2, seed=5)
    b = plain[0]
    assert b.support_x.shape == (2, 6, 3, 16, 16) and b.query_x.shape == (2, 6, 3, 16, 16)
    assert b.support_y[0].tolist() == [0, 0, 1, 1, 2, 2] and b.query_y[1].tolist() == [0, 0, 1, 1, 2, 2]
    # normalised: the raw sampler's [0, 1] images, minus the mean, over the std
    raw = EpisodeSampler(data.splits["train"].images, 3, 2, 2, 2, seed=5, class_sizes=data.splits["train"].counts)[0]
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    torch.testing.assert_close(b.support_x, (raw.support_x - mean) / std)
    # augmented: the same images drawn, each cropped and flipped; deterministic given (seed, i)
    aug = data.episodes("train", n_way=3, k_shot=2, n_query=2, tasks=2, seed=5, augment=True)
    a, again = aug[0], data.episodes("train", n_way=3, k_shot=2, n_query=2, tasks=2, seed=5, augment=True)[0]
    assert torch.equal(a.support_x, again.support_x) and torch.equal(a.query_x, again.query_x)
    assert not torch.equal(a.support_x, b.support_x) and not torch.equal(aug[1].support_x, a.support_x)
    for t in range(2):  # each augmented image is a shifted (and maybe mirrored) window of its original
        for n in range(6):
            orig = raw.support_x[t, n]
            found = False
            for flip in (False, True):
                o = orig.flip(-1) if flip else orig
                padded = torch.nn.functional.pad(o, (2, 2, 2, 2))
                for dy in range(5):
                    for dx in range(5):
                        if torch.allclose((padded[:, dy : dy + 16, dx : dx + 16] - mean) / std, a.support_x[t, n]):
                            found = True
            assert found
    # a sharded run draws the same augmented tasks
    half = data.episodes("train", n_way=3, k_shot=2, n_query=2, tasks=2, seed=5, augment=True, shard=(1, 2))[0]
    assert torch.equal(half.support_x[0], a.support_x[1])
    with pytest.raises(ValueError, match="augment is for the training episodes"):
        data.episodes("val", n_way=3, k_shot=2, n_query=2, augment=True)


def test_episode_sampler_class_sizes_keep_old_draws():
    data = torch.arange(5 * 6).view(5, 6, 1).to(torch.uint8)
    old = EpisodeSampler(data, 3, 1, 2, tasks=2, seed=4)
    same = EpisodeSampler(data, 3, 1, 2, tasks=2, seed=4, class_sizes=[6] * 5)
    assert torch.equal(old[3].support_x, same[3].support_x) and torch.equal(old[3].query_x, same[3].query_x)
    short = EpisodeSampler(data, 3, 1, 2, tasks=4, seed=4, class_sizes=[3, 4, 6, 3, 5])
    for i in range(20):
        b = short[i]
        ids = (torch.cat([b.support_x, b.query_x], 1) * 255).round().long().flatten()
        assert ((ids % 6) < torch.tensor([3, 4, 6, 3, 5])[ids // 6]).all()
    with pytest.raises(ValueError, match="class_sizes must give each of the 5 classes a size in \\[0, 6\\]"):
        EpisodeSampler(data, 3, 1, 2, class_sizes=[7, 1, 1, 1, 1])


def test_cache_reused_and_rebuilt_when_files_or_code_change(tmp_path, monkeypatch):
    make_folder(tmp_path / "ds")
    calls = []
    decode = decoding._decode_file
    monkeypatch.setattr(decoding, "_decode_file", lambda *a: calls.append(a[0]) or decode(*a))
    first = load_fewshot("folder", tmp_path / "ds", image_size=16, progress=False)
    assert len(calls) == 29
    calls.clear()
    load_fewshot("folder", tmp_path / "ds", image_size=16, progress=False)
    assert calls == []  # from the cache
    load_fewshot("folder", tmp_path / "ds", image_size=12, progress=False)
    assert len(calls) == 29  # another size: another cache
    calls.clear()
    changed = tmp_path / "ds" / "val" / "val1" / "002.png"
    new = pixels(16, 16)
    Image.fromarray(new).save(changed)
    os.utime(changed, ns=(10**18, 10**18))  # a newer time, whatever the clock's resolution
    rebuilt = load_fewshot("folder", tmp_path / "ds", image_size=16, progress=False)
    assert len(calls) == 29 and torch.equal(rebuilt.splits["val"].images[1, 2], chw(new))
    assert not os.path.exists(first.cache_file)  # the stale cache of that folder and size is gone
    calls.clear()
    monkeypatch.setattr(decoding, "DECODE_VERSION", decoding.DECODE_VERSION + 1)
    load_fewshot("folder", tmp_path / "ds", image_size=16, progress=False)
    assert len(calls) == 29  # new decoding code: decoded again


def test_concurrent_loads_decode_once(tmp_path, monkeypatch):
    """Two loads at once (as torchrun's ranks on a first run): one decodes, the other waits and reads its cache."""
    make_folder(tmp_path / "ds")
    calls = []
    decode = decoding._decode_file
    slow = lambda *a: calls.append(a[0]) or time.sleep(0.01) or decode(*a)  # noqa: E731  (the loads overlap)
    monkeypatch.setattr(decoding, "_decode_file", slow)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(load_fewshot("folder", tmp_path / "ds", 16, progress=False)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 29 and len(results) == 2
    assert torch.equal(results[0].splits["train"].images, results[1].splits["train"].images)


def test_layout_errors(tmp_path):
    tried = "(?s)mini-ImageNet not found in .*pickle: mini-imagenet-cache-train.pkl.*csv: train.csv, val.csv, test.csv"
    with pytest.raises(FileNotFoundError, match=tried):
        load_fewshot("miniimagenet", tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_fewshot("cub", tmp_path / "nowhere", progress=False)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_fewshot("imagenet", tmp_path)
    # two datasets in the folder given: which one is meant is not clear
    make_cub(tmp_path / "two", counts=(2,) * 4, size=(8, 8))
    shutil.copytree(tmp_path / "two" / "CUB_200_2011", tmp_path / "two" / "CUB_copy")
    with pytest.raises(ValueError, match="several folders in .*two look like it: .*CUB_200_2011, .*CUB_copy"):
        load_fewshot("cub", tmp_path / "two", progress=False)
    # a split file missing
    make_cifarfs(tmp_path / "fs", classes=(2, 1, 1), n=2)
    (tmp_path / "fs" / "splits" / "bertinetto" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no split file .*splits/bertinetto/val.txt"):
        load_fewshot("cifarfs", tmp_path / "fs", progress=False)
    make_mini_csv(tmp_path / "mini", classes=(2, 1, 1), n=2, size=8)
    (tmp_path / "mini" / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no test.csv in .*mini"):
        load_fewshot("miniimagenet", tmp_path / "mini", progress=False)
    # an image folder missing
    make_folder(tmp_path / "f", {"train": [2], "test": [2]})
    with pytest.raises(FileNotFoundError, match="folder layout: no folder .*f/val"):
        load_fewshot("folder", tmp_path / "f", progress=False)
    # an image named in a csv that is not there
    (tmp_path / "mini" / "test.csv").write_text("filename,label\nmissing.jpg,nx\n")
    with pytest.raises(FileNotFoundError, match="are not under .*mini/images; the first: missing.jpg \\(test.csv\\)"):
        load_fewshot("miniimagenet", tmp_path / "mini", progress=False)


def test_an_image_that_does_not_decode_is_named(tmp_path):
    make_cub(tmp_path, counts=(2, 2, 2, 2), size=(8, 8))
    bad = tmp_path / "CUB_200_2011" / "images" / "003.Bird_2" / "001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*003.Bird_2/001.jpg"):
        load_fewshot("cub", tmp_path / "CUB_200_2011", image_size=8, progress=False, workers=2)
    assert not list((tmp_path / "cache").glob("*.pt"))  # nothing cached


SCALED = ["--iterations", "2", "--val-every", "2", "--val-episodes", "1", "--meta-batch", "2", "--n-query", "2"]


@pytest.mark.parametrize(
    "dataset,make,algo,backbone",
    [
        ("folder", lambda root: make_folder(root, dict(train=[4] * 4, val=[4] * 3, test=[4] * 3)), "protonet", "conv4"),
        ("cifarfs", lambda root: make_cifarfs(root, classes=(4, 3, 3), n=4), "maml", "conv4"),
        ("cub", lambda root: make_cub(root, counts=(4,) * 12, size=(20, 16)), "protonet", "resnet12"),
    ],
)  # fmt: skip
def test_cli_train_and_eval(tmp_path, capsys, dataset, make, algo, backbone):
    from fastmeta.cli import main

    make(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--dataset", dataset, "--data", str(tmp_path / "data"), "--algo", algo, "--backbone", backbone]
    argv += ["--n-way", "3", "--image-size", "16", "--augment", "--out", str(out), "--test-episodes", "2", *SCALED]
    if algo == "maml":
        argv += ["--inner-steps", "1", "--eval-inner-steps", "1", "--inner-lr", "0.01"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(["eval", str(out / "best.pt"), "--episodes", "4", "--tasks-per-batch", "2"]) == 0
    said = capsys.readouterr().out
    assert f"{algo} {dataset} 3-way 1-shot, test split, 4 tasks" in said
    state = torch.load(out / "best.pt", weights_only=False)
    assert state["model_config"]["in_channels"] == 3 and state["config"]["augment"] is True


def test_cli_errors_are_one_line(tmp_path, capsys):
    from fastmeta.cli import main

    runs = [
        (["--dataset", "miniimagenet"], "miniimagenet needs --data PATH"),
        (["--dataset", "cub", "--data", str(tmp_path)], "CUB-200-2011 not found in"),
        (["--dataset", "omniglot", "--augment"], "augment is a setting of folder and miniimagenet"),
    ]
    for args, message in runs:
        assert main(["train", *args, "--out", str(tmp_path / "run"), *SCALED]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
