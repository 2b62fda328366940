"""Decode and cache-load times of fastmeta.data.load_fewshot on a synthetic mini-ImageNet-sized set: 100 classes
(64/16/20) of 600 84x84 JPEGs in Ravi & Larochelle's images/ + train.csv/val.csv/test.csv layout.

    python benchmarks/fewshot_decode.py [--root /tmp/fewshot_bench] [--classes 100] [--per-class 600] [--workers 1,2]
    python benchmarks/fewshot_decode.py --classes 10 --per-class 100 --source-size 500x375   # ImageNet-sized files

The images (smooth random colour fields plus noise, about the size of real 84x84 JPEGs) are written once under
--root and reused; every decode starts from an empty cache folder under --root. With files larger than 84x84,
the decode is also timed with Pillow's draft mode (libjpeg's reduced-scale decoding) switched off.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(root: Path, classes: int, per_class: int, size: tuple[int, int] = (84, 84)) -> Path:
    from PIL import Image

    data = (
        root / f"mini-{classes}x{per_class}"
        if size == (84, 84)
        else root / f"mini-{classes}x{per_class}-{size[0]}x{size[1]}"
    )
    if (data / "test.csv").is_file():
        return data
    (data / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    split = [round(classes * f) for f in (0.64, 0.16)]
    parts = {"train": range(split[0]), "val": range(split[0], sum(split)), "test": range(sum(split), classes)}
    tic = time.time()
    for part, cs in parts.items():
        lines = ["filename,label"]
        for c in cs:
            label = f"n{c:08d}"
            for e in range(per_class):
                low = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
                im = np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC), dtype=np.int16)
                im = np.clip(im + rng.integers(-12, 13, im.shape), 0, 255).astype(np.uint8)
                name = f"{label}{e:08d}.jpg"
                Image.fromarray(im).save(data / "images" / name, quality=90)
                lines.append(f"{name},{label}")
        (data / f"{part}.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {classes * per_class} JPEGs to {data} in {time.time() - tic:.0f} s", flush=True)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/fewshot_bench")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=600)
    p.add_argument("--workers", default="1,2", help="comma-separated thread counts to decode with")
    p.add_argument("--source-size", default="84x84", help="WxH of the JPEG files (they are decoded to 84x84)")
    p.add_argument("--batches", type=int, default=100, help="episode batches timed after each cache load")
    args = p.parse_args()
    source = tuple(int(v) for v in args.source_size.split("x"))

    import torch

    from fastmeta.data import cache, decoding, load_fewshot

    root = Path(args.root)
    data = make_images(root, args.classes, args.per_class, source)
    files = list((data / "images").iterdir())
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(
        f"{len(files)} files, {mb:.0f} MB, mean {1e3 * mb / len(files):.1f} kB; torch threads {torch.get_num_threads()}"
    )
    saved = []
    save = cache.save_cached

    def timed_save(obj: dict, path: Path) -> bool:
        tic = time.perf_counter()
        ok = save(obj, path)
        saved.append(time.perf_counter() - tic)
        return ok

    cache.save_cached = timed_save
    cache_dir = root / "cache"
    for w in [int(x) for x in args.workers.split(",")]:
        shutil.rmtree(cache_dir, ignore_errors=True)
        tic, cpu = time.perf_counter(), time.process_time()
        ds = load_fewshot("miniimagenet", data, cache_dir=cache_dir, workers=w, progress=False)
        total, cpu = time.perf_counter() - tic, time.process_time() - cpu
        n = sum(int(s.counts.sum()) for s in ds.splits.values())
        print(
            f"first load, {w} decoding thread(s): {total:.1f} s ({1e3 * (total - saved[-1]) / n:.3f} ms an image "
            f"decoded; of the total, writing the {os.path.getsize(ds.cache_file) / 1e9:.2f} GB cache took "
            f"{saved[-1]:.1f} s); CPU time of all threads {cpu:.1f} s ({1e3 * cpu / n:.3f} ms an image)",
            flush=True,
        )
        del ds
    if source != (84, 84):  # the same without libjpeg's reduced-scale decoding
        from PIL import JpegImagePlugin

        draft = JpegImagePlugin.JpegImageFile.draft
        JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None
        shutil.rmtree(cache_dir, ignore_errors=True)
        tic = time.perf_counter()
        ds = load_fewshot("miniimagenet", data, cache_dir=cache_dir, workers=2, progress=False)
        total = time.perf_counter() - tic
        print(f"first load without draft, 2 threads: {total:.1f} s ({1e3 * (total - saved[-1]) / n:.3f} ms an image)")
        JpegImagePlugin.JpegImageFile.draft = draft
        del ds
    for _ in range(2):
        tic = time.perf_counter()
        ds = load_fewshot("miniimagenet", data, cache_dir=cache_dir, progress=False)
        loaded = time.perf_counter() - tic
        episodes = ds.episodes("train", 5, 1, 15, tasks=4)
        tic = time.perf_counter()
        for i in range(args.batches):
            episodes[i]
        print(
            f"second load (the cache, memory-mapped): {loaded:.2f} s; then {args.batches} batches of 4 5-way 1-shot "
            f"15-query episodes: {time.perf_counter() - tic:.2f} s",
            flush=True,
        )
    tic = time.perf_counter()
    full = cache.load_cached(Path(ds.cache_file), mmap=False)
    print(f"reading the whole cache into memory (torch.load without mmap): {time.perf_counter() - tic:.2f} s")
    del full
    assert decoding.DECODE_VERSION >= 1


if __name__ == "__main__":
    main()
