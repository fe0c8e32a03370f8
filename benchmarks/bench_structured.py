"""Structured pruning: does removing X% of FLOPs make models really smaller and faster?

For each model, ``prune_to_flops`` (L1 filter importance, Li et al. 2017; one uniform ratio
found by bisection) removes 30 / 50 / 70% of the MACs. We report parameters, MACs, the
on-disk size of the ``save_compact`` export, and CPU latency with ``torch.set_num_threads(2)``.
Dense and pruned models are timed in interleaved rounds (each round times every variant
once), medians over rounds are reported, so drifting background load hits all variants
alike; the speed-up is printed next to the FLOP ratio it should ideally match.

Run: ``nice -n 10 python benchmarks/bench_structured.py [--models resnet20,resnet56,vgg16,resnet50]
[--rounds 7] [--out FILE]``; nothing is written without ``--out``
"""
from __future__ import annotations

import argparse
import json
import os

# With more threads than free cores (other jobs running), OpenMP's default spin-waiting makes
# a 2-thread ResNet-20 forward ~100x slower; passive waiting keeps timings meaningful.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from secateurs.models import create_model
from secateurs.structured import model_cost, prune_to_flops, save_compact

FRACTIONS = (0.3, 0.5, 0.7)
# name -> (factory kwargs, image side, batch sizes)
SETUPS = {
    "resnet20": (dict(num_classes=10, in_channels=3, image_size=32), 32, (1, 64)),
    "resnet56": (dict(num_classes=10, in_channels=3, image_size=32), 32, (1, 64)),
    "vgg16": (dict(num_classes=10, in_channels=3, image_size=32), 32, (1, 64)),
    # batch 64 at 224x224 takes seconds per forward on 2 shared threads: batch 8 instead
    "resnet50": (dict(num_classes=1000, in_channels=3, image_size=224), 224, (1, 8)),
}


def disk_bytes(model: nn.Module, x: torch.Tensor) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt2"
        save_compact(model, path, x)
        return path.stat().st_size


def seconds_per_forward(model: nn.Module, x: torch.Tensor, min_time: float = 0.3) -> float:
    """Mean time of back-to-back forwards, repeated until ``min_time`` has passed."""
    n, start = 0, time.perf_counter()
    while True:
        model(x)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def latencies(models: list[nn.Module], x: torch.Tensor, rounds: int) -> list[float]:
    """Median seconds per forward of each model, timed in interleaved rounds."""
    samples: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:  # warm-up
            m(x)
        for _ in range(rounds):
            for i, m in enumerate(models):
                samples[i].append(seconds_per_forward(m, x))
    return [statistics.median(s) for s in samples]


def bench_model(name: str, rounds: int) -> list[dict]:
    kwargs, side, batches = SETUPS[name]
    torch.manual_seed(0)
    dense = create_model(name, **kwargs).eval()
    x1 = torch.randn(1, 3, side, side)
    variants: list[tuple[float, nn.Module, float]] = [(0.0, dense, 0.0)]
    for fraction in FRACTIONS:
        start = time.perf_counter()
        pruned, ratio = prune_to_flops(dense, x1, fraction, importance="l1", tolerance=0.01)
        print(f"  {name}: {fraction:.0%} FLOPs -> channel ratio {ratio:.3f} ({time.perf_counter() - start:.1f}s)", flush=True)
        variants.append((fraction, pruned.eval(), ratio))
    costs = [model_cost(m, x1) for _, m, _ in variants]
    sizes = [disk_bytes(m, x1) for _, m, _ in variants]
    rows = []
    timings = {b: latencies([m for _, m, _ in variants], torch.randn(b, 3, side, side), rounds) for b in batches}
    for i, (fraction, _, ratio) in enumerate(variants):
        row = {
            "model": name, "input": f"3x{side}x{side}", "target_flops_removed": fraction, "channel_ratio": round(ratio, 4),
            "parameters": costs[i].parameters, "macs": costs[i].macs,
            "flops_removed": round(1 - costs[i].macs / costs[0].macs, 4),
            "flop_ratio": round(costs[0].macs / costs[i].macs, 3),
            "param_ratio": round(costs[0].parameters / costs[i].parameters, 3),
            "disk_bytes": sizes[i],
        }
        for b, t in timings.items():
            row[f"latency_ms_batch{b}"] = round(1000 * t[i], 3)
            row[f"speedup_batch{b}"] = round(t[0] / t[i], 3)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| model | FLOPs removed | params | MMACs | disk MB | FLOP ratio | batch 1 ms (speed-up) | large batch ms (speed-up) |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lat = [k for k in r if k.startswith("latency_ms_batch")]
        cells = [f"{r[k]:.2f} ({r[k.replace('latency_ms', 'speedup')]:.2f}x, b={k.rsplit('batch', 1)[1]})" for k in lat]
        lines.append(
            f"| {r['model']} | {r['flops_removed']:.1%} (target {r['target_flops_removed']:.0%}) | "
            f"{r['parameters'] / 1e6:.3f}M | {r['macs'] / 1e6:.1f} | {r['disk_bytes'] / 1e6:.2f} | "
            f"{r['flop_ratio']:.2f}x | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet20,resnet56,vgg16,resnet50")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file (default: print them, write nothing)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows: list[dict] = []
    load = [round(v, 2) for v in os.getloadavg()]
    for name in args.models.split(","):
        print(f"benchmarking {name}", flush=True)
        rows += bench_model(name, args.rounds)
    result = {
        "benchmark": "structured pruning: size and CPU latency at 30/50/70% FLOPs removed (L1, uniform ratio)",
        "models": args.models.split(","),
        "note": (
            "CPU timings with torch.set_num_threads(2); dense and pruned variants are interleaved "
            "round by round and medians reported, so compare ratios, not absolute ms. resnet50 uses "
            "batch 8 instead of 64 (seconds per forward at 224x224 on 2 threads). MACs count "
            "conv/linear only, per example. OMP_WAIT_POLICY=PASSIVE is set (spin-waiting OpenMP "
            "threads made 2-thread timings ~100x slower when other jobs shared the cores). "
            "load_average is the machine's 1/5/15-minute load when the run started."
        ),
        "load_average": load,
        "torch": torch.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rounds": args.rounds, "rows": rows,
    }
    print(markdown(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
