"""Hessian spectral-radius neuron pruning vs L1 neuron pruning, LeNet-300-100 on MNIST.

Both criteria train from scratch with the same seed, data order, optimizer and cubic
neuron schedule (:class:`secateurs.methods.hessian_neurons.HessianNeuronPruning`); only the
ranking of the neurons differs. Per run: test accuracy, the neurons left per layer, the
spectral radius of the final network's Hessian on a fixed batch of 1,024 training images,
and the time spent in Hessian power iterations vs the whole run.

Run: ``python reproductions/hessian-neurons-mnist/run.py [--epochs 4] [--seeds 0 1]
[--ratios 0.5 0.8 0.9] [--out DIR]``; nothing is written without ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from secateurs.analysis.hessian import model_hessian, top_eigenvalue
from secateurs.data.mnist import load_mnist_pickle
from secateurs.methods.hessian_neurons import HessianNeuronPruning
from secateurs.models.mlp import lenet300_100


def _tensors(images, labels, mean, std):
    x = images.float().div(255).sub(mean[0]).div(std[0])
    return x, labels.long()


def run_one(data, criterion: str, ratio: float, seed: int, epochs: int, batch: int, every: int, iters: int) -> dict:
    xtr, ytr, xte, yte, probe = data
    torch.manual_seed(seed)
    model = lenet300_100()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps_per_epoch = len(xtr) // batch
    total = steps_per_epoch * epochs
    pruner = None
    if ratio > 0:
        pruner = HessianNeuronPruning(model, opt, ratio=ratio, total_steps=total, every=every, criterion=criterion,
                                      power_iters=iters, tol=1e-3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=g)
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            x, y = xtr[idx], ytr[idx]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if pruner is not None:
                pruner.step((x, y))
    wall = time.perf_counter() - began
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    final = top_eigenvalue(model_hessian(model, F.cross_entropy, *probe), max_iter=100, tol=1e-4, seed=0)
    hist = pruner.history if pruner is not None else []
    return {
        "criterion": criterion if ratio > 0 else "dense", "ratio": ratio, "seed": seed, "test_acc": acc,
        "alive": pruner.stats()["alive"] if pruner else {"net.1": 300, "net.3": 100},
        "removed": pruner.removed if pruner else 0, "final_rho": final.spectral_radius,
        "final_rho_converged": final.converged, "updates": len(hist),
        "hessian_s": sum(h.get("hessian_s", 0.0) for h in hist), "wall_s": wall,
        "rho_during": [round(h["rho"], 3) for h in hist if "rho" in h],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--train-subset", type=int, default=None, help="first N training images (for a quick check)")
    parser.add_argument("--out", type=Path, help="directory for results.json and results.md (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    ds = load_mnist_pickle()
    xtr, ytr = _tensors(ds.train_images, ds.train_labels, ds.mean, ds.std)
    if args.train_subset:
        xtr, ytr = xtr[:args.train_subset], ytr[:args.train_subset]
    xte, yte = _tensors(ds.test_images, ds.test_labels, ds.mean, ds.std)
    probe = (xtr[:1024], ytr[:1024])
    data = (xtr, ytr, xte, yte, probe)
    began = time.perf_counter()
    rows = []
    for seed in args.seeds:
        rows.append(run_one(data, "dense", 0.0, seed, args.epochs, args.batch, args.every, args.iters))
        for ratio in args.ratios:
            for criterion in ("hessian", "l1"):
                rows.append(run_one(data, criterion, ratio, seed, args.epochs, args.batch, args.every, args.iters))
                r = rows[-1]
                print(f"seed {seed} ratio {ratio:g} {criterion:7s} acc {r['test_acc']:.4f} alive {r['alive']} "
                      f"rho_final {r['final_rho']:.2f} hessian {r['hessian_s']:.1f}s / run {r['wall_s']:.1f}s",
                      flush=True)
    total = time.perf_counter() - began
    table = ["| neurons removed | criterion | test acc (mean over seeds) | per seed | hidden left (300-100) "
             "| final rho(H) | Hessian time / run time |", "|---|---|---|---|---|---|---|"]
    for ratio in [0.0, *args.ratios]:
        for criterion in (("dense",) if ratio == 0 else ("hessian", "l1")):
            sel = [r for r in rows if r["ratio"] == ratio and r["criterion"] == criterion]
            accs = [r["test_acc"] for r in sel]
            left = "; ".join("-".join(str(v) for v in r["alive"].values()) for r in sel)
            share = statistics.mean(r["hessian_s"] / r["wall_s"] for r in sel)
            table.append(f"| {ratio:.0%} | {criterion} | {statistics.mean(accs):.2%} | "
                         f"{', '.join(f'{a:.2%}' for a in accs)} | {left} | "
                         f"{', '.join(format(r['final_rho'], '.1f') for r in sel)} | {share:.1%} |")
    summary = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "total_s": round(total, 1), "rows": rows, "torch": torch.__version__}
    md = (f"LeNet-300-100 on MNIST, {args.epochs} epochs, SGD lr 0.05 momentum 0.9, batch {args.batch}; neurons "
          f"removed on a cubic schedule over the first half of training, updated every {args.every} steps; "
          f"seeds {args.seeds}; power iteration <= {args.iters} products, tol 1e-3. Total {total:.0f} s.\n\n"
          + "\n".join(table) + "\n")
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
        (args.out / "results.md").write_text(md)
    return summary


if __name__ == "__main__":
    main()
