"""i-SpaSP against L1 and first-order Taylor on MNIST fully connected networks (the paper's FC
setting): a 2-layer MLP 784-1000-10 and LeNet-300-100. Per seed and network: train dense
(1 epoch, Adam 1e-3, batch 128), then for each criterion and each level prune the *same* dense
network to keep 30 / 50 / 70 % of its MACs (prune_to_flops: a uniform per-layer ratio
bisected), measure test accuracy, fine-tune 1 epoch (Adam 1e-4) and measure again. i-SpaSP
and Taylor read the same 10 unshuffled training batches of 128 images; i-SpaSP runs 20 iterations.

    .venv/bin/python reproductions/ispasp-mlp-mnist/run.py --seeds 0 1 2
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from secateurs.data import load_dataset
from secateurs.models import MLP
from secateurs.structured import ISpaSP, build_graph, model_cost, prune_to_flops, taylor_importance

HERE = Path(__file__).parent
KEEP = (0.3, 0.5, 0.7)
NETS = {"mlp-784-1000-10": (1000,), "lenet-300-100": (300, 100)}


def loaders(dataset="mnist"):
    d = load_dataset(dataset)
    mean, std = d.mean[0], d.std[0]  # MNIST: 0.1307 / 0.3081
    norm = lambda x: ((x.float() / 255.0) - mean) / std  # noqa: E731
    return norm(d.train_images), d.train_labels, norm(d.test_images), d.test_labels


def train(model, x, y, lr, seed, epochs=1, batch=128):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = loaders(args.dataset)
    probe = [(xtr[i:i + 128], ytr[i:i + 128]) for i in range(0, 1280, 128)]
    example = xtr[:2]
    rows, start = [], time.time()
    for seed in args.seeds:
        for net in args.nets:
            hidden = NETS[net]
            torch.manual_seed(seed)
            dense = train(MLP(784, hidden, 10), xtr, ytr, 1e-3, seed).eval()
            dense_acc, dense_macs = accuracy(dense, xte, yte), model_cost(dense, example).macs
            graph = build_graph(dense, example)
            importances = {
                "l1": "l1",
                "taylor": taylor_importance(dense, graph, probe),
                "ispasp": ISpaSP(probe, iterations=20),
            }
            for name, importance in importances.items():
                for keep in KEEP:
                    t0 = time.time()
                    pruned, _ = prune_to_flops(dense, example, 1 - keep, importance=importance)
                    prune_s = time.time() - t0
                    before = accuracy(pruned, xte, yte)
                    after = accuracy(train(pruned, xtr, ytr, 1e-4, seed + 1000), xte, yte)
                    row = {"seed": seed, "net": net, "importance": name, "keep_flops": keep,
                           "macs_kept": model_cost(pruned, example).macs / dense_macs,
                           "widths": [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)][:-1],
                           "dense_acc": dense_acc, "acc_before_ft": before, "acc_after_ft": after, "prune_s": prune_s}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = {"rows": rows, "seconds": time.time() - start, "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(out, indent=1))
    Path(args.out).with_suffix(".md").write_text(table(rows, out["seconds"]))
    print(table(rows, out["seconds"]))


def table(rows, seconds):
    lines = [f"Mean over seeds {sorted({r['seed'] for r in rows})} (min-max in brackets); test accuracy %, "
             f"before / after 1 epoch of fine-tuning. Total {seconds / 60:.1f} min.", "",
             "| network | keep FLOPs | dense | L1 before | Taylor before | i-SpaSP before | L1 after | Taylor after | i-SpaSP after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for net in NETS:
        for keep in KEEP:
            def cell(imp, key):
                v = [100 * r[key] for r in rows if r["net"] == net and r["keep_flops"] == keep and r["importance"] == imp]
                return f"{statistics.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "-"
            d = [100 * r["dense_acc"] for r in rows if r["net"] == net and r["importance"] == "l1" and r["keep_flops"] == keep]
            if not d:
                continue
            lines.append(f"| {net} | {keep:.0%} | {statistics.mean(d):.2f} | "
                         + " | ".join(cell(i, "acc_before_ft") for i in ("l1", "taylor", "ispasp")) + " | "
                         + " | ".join(cell(i, "acc_after_ft") for i in ("l1", "taylor", "ispasp")) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
