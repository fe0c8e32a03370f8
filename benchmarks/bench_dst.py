"""Cost of pruning during training: one epoch of ResNet-20 on CIFAR-shaped data, dense vs.
GMP vs. SET vs. RigL vs. GraNet, as ratios to dense measured side by side in one run.

Every method runs the same steps on the same in-memory batches; the sparse methods pay the
per-step mask enforcement (one foreach multiply) and, every ``--every`` steps, a mask update
(GraNet: a global prune and a per-layer drop-and-grow; RigL: drop-and-grow with the dense
gradient). The model computes densely (PyTorch has no fast unstructured-sparse conv), so the
ratio is pure bookkeeping overhead; the goal is <= 1.05x. Variants are interleaved in rounds
of ``--steps`` steps and the median round is reported, so drifting load hits all alike.

Run: ``python benchmarks/bench_dst.py [--quick] [--device cpu|cuda] [--out FILE]``; nothing is written
without ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from secateurs.methods import GMP, SET, GraNet, RigL
from secateurs.models import create_model

METHODS = {
    "dense": None,
    "gmp": lambda m, o, T, every: GMP(m, o, sparsity=0.9, total_steps=T, every=every, end="50%"),
    "set": lambda m, o, T, every: SET(m, o, sparsity=0.9, total_steps=T, every=every, end="100%"),
    "rigl": lambda m, o, T, every: RigL(m, o, sparsity=0.9, total_steps=T, every=every, end="100%"),
    "granet": lambda m, o, T, every: GraNet(m, o, sparsity=0.9, total_steps=T, every=every, end="100%"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def update_cost_ms(name: str, base, x, y, total: int, every: int, repeats: int = 5) -> float:
    """Median wall time of one ``sparsifier.step()`` that performs a mask update (prune and/or
    swap), after a real backward so the dense gradient is there; amortised over ``every``."""
    model = copy.deepcopy(base).to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=True)
    sp = METHODS[name](model, opt, total, every)
    times = []
    for k in range(1, repeats + 1):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sp.steps = k * every - 1  # the next step() is an update step
        sync(x.device)
        start = time.perf_counter()
        sp.step()
        sync(x.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="steps per round (one update per round at --every 100)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--every", type=int, default=100, help="mask update interval (RigL's 100)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 20 steps, update every 10 (smoke run)")
    parser.add_argument("--update-only", action="store_true", help="only the per-update cost (fast)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file (default: print them, write nothing)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.every = 2, 20, 10
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = create_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    n_batches = 8
    xs = torch.randn(n_batches, args.batch_size, 3, 32, 32, device=device)
    ys = torch.randint(0, 10, (n_batches, args.batch_size), device=device)
    total = args.rounds * args.steps + 1
    update_ms = {n: update_cost_ms(n, base, xs[0], ys[0], 10 * args.every, args.every) for n in METHODS if n != "dense"}
    if args.update_only:
        print(json.dumps({"update_ms": update_ms}, indent=2))
        return
    runs = {}
    for name, factory in METHODS.items():
        model = copy.deepcopy(base).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
        sparsifier = factory(model, opt, total, args.every) if factory else None
        runs[name] = (model, opt, sparsifier)
    # warm-up
    for model, opt, sp in runs.values():
        for i in range(3):
            loss = F.cross_entropy(model(xs[i]), ys[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(args.rounds):
        for name, (model, opt, sp) in runs.items():
            sync(device)
            start = time.perf_counter()
            for i in range(args.steps):
                loss = F.cross_entropy(model(xs[i % n_batches]), ys[i % n_batches])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sp is not None:
                    sp.step()
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    dense = statistics.median(times["dense"])
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "model": "resnet20", "batch_size": args.batch_size, "steps_per_round": args.steps,
        "rounds": args.rounds, "every": args.every,
        "step_ms": {n: 1000 * statistics.median(t) for n, t in times.items()},
        "ratio_to_dense": {n: statistics.median(t) / dense for n, t in times.items()},
        "updates": {n: len(sp.history) for n, (_, _, sp) in runs.items() if sp is not None},
        "update_ms": update_ms,
        "update_share_of_dense_steps": {n: ms / (args.every * 1000 * dense) for n, ms in update_ms.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
