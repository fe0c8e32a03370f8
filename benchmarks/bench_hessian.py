"""What the Hessian's spectral radius costs next to a training step, measured side by side.

LeNet-300-100 (266,610 parameters) on MNIST-shaped batches: one SGD training step (forward,
backward, update) against one spectral-radius estimate (gradient with ``create_graph``, then
``iters`` Hessian-vector products by power iteration, tolerance set so it runs all of them),
interleaved round by round in one process, medians reported, plus the cost of one
Hessian-vector product. Random inputs: the cost does not depend on the pixel values.

Run: ``python benchmarks/bench_hessian.py [--rounds 20] [--iters 20] [--out FILE]``; nothing
is written without ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from secateurs.analysis.hessian import model_hessian, top_eigenvalue
from secateurs.models.mlp import lenet300_100


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--iters", type=int, default=20, help="power iterations per estimate")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file (default: print them, write nothing)")
    args = parser.parse_args(argv)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(0)
        model = lenet300_100()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(args.batch, 1, 28, 28, generator=g), torch.randint(0, 10, (args.batch,), generator=g)

        def train_step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def estimate():
            op = model_hessian(model, F.cross_entropy, x, y)
            return top_eigenvalue(op, max_iter=args.iters, tol=1e-30, seed=0)

        train_step(), estimate()  # warm-up
        step_s, est_s, iters = [], [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            train_step()
            t1 = time.perf_counter()
            r = estimate()
            t2 = time.perf_counter()
            step_s.append(t1 - t0)
            est_s.append(t2 - t1)
            iters.append(r.iterations)
    finally:
        torch.set_num_threads(previous)
    step, est = statistics.median(step_s), statistics.median(est_s)
    out = {
        "model": "lenet300_100", "params": sum(p.numel() for p in model.parameters()), "batch": args.batch,
        "threads": args.threads, "rounds": args.rounds, "power_iterations": max(iters),
        "train_step_ms": round(step * 1e3, 3), "spectral_radius_ms": round(est * 1e3, 3),
        "ratio_estimate_to_step": round(est / step, 2),
        "ratio_per_hvp_to_step": round(est / max(iters) / step, 2),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    print(json.dumps(out, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
