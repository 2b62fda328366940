"""`python -m fastmeta`: the command line.

python -m fastmeta bench [--device cpu|cuda] [--workload conv4|mlp] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def _bench(args: argparse.Namespace) -> int:
    import fastmeta
    from fastmeta import bench

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    info = fastmeta.kernels_info()
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    kernels = "loaded" if info["available"] else f"MISSING: {info['error']}"
    print(
        f"fastmeta {fastmeta.__version__}, torch {torch.__version__}, device {args.device} ({where}), "
        f"{torch.get_num_threads()} CPU threads, kernels {kernels}"
    )
    if args.malloc == "warm" and args.device == "cpu":
        print(
            "glibc keeps freed memory in this process (see fastmeta.bench.keep_freed_memory):",
            bench.keep_freed_memory(),
        )
    workloads = [w for w in bench.WORKLOADS if args.workload in (None, w.name)]
    rows = bench.run_fast_weight_update(args.device, workloads, min_time=args.min_time)
    print("\nfast_weight_update (median per call; speed-up = other method's time / fastmeta's)\n")
    print(bench.format_table(rows))
    if args.device.startswith("cuda"):
        numel = sum(torch.Size(s).numel() for s in bench.CONV4_SHAPES) * 32
        bw = bench.copy_bandwidth(numel, args.device)
        print(f"\nsame-sized copy (conv4 T=32, float32): {bw / 1e9:.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmeta", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the kernels against the reference and the usual alternatives")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    b.add_argument("--workload", choices=["conv4", "mlp"], default=None, help="only this workload")
    b.add_argument("--min-time", type=float, default=0.3, help="seconds to time each measurement (default 0.3)")
    b.add_argument(
        "--malloc",
        choices=["warm", "default"],
        default="warm",
        help="warm: keep freed memory in the process, so no method pays page faults by luck (default)",
    )
    b.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)
