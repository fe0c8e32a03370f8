"""Structured pruning of Hugging Face models on real data, secateurs against Torch-Pruning.

    python benchmarks/bench_hf_structured.py --out runs/bench-hf-structured   (about 10 min on 2 cores)
    python benchmarks/bench_hf_structured.py --smoke                        (seconds: tiny sizes)

Two models from ``transformers`` configs (random init, no download), trained on Fashion-MNIST:
a ViT (4 layers, 4 heads, hidden 64) and a MobileNetV2 (width 0.5). Each is pruned to 30% and
50% fewer MACs, iteratively: 3 steps of (first-order Taylor importance on 8 training batches,
prune to the step's MAC target, fine-tune a third of an epoch), then evaluated.

* **secateurs** takes the raw model: heads and MLP units of the ViT by its block handlers
  (``prune_units_to_macs``), the MobileNetV2's channels by the dependency graph captured by
  running it (``prune_to_flops``).
* **Torch-Pruning** (``torch-pruning``, the anchor): ``MetaPruner`` with ``TaylorImportance``
  on the same schedule. It needs what its README asks of a user: a wrapper returning the
  logits, a hand-written ``num_heads`` map and head-count fix-up for the ViT, and the
  classifier in ``ignored_layers``. Its channel ratio is bisected to the same MAC target. It
  prunes what its graph couples, which for the ViT includes the embedding width.

Every model's test accuracy, parameters, MACs (``secateurs.analysis.flops.layer_macs``) and CPU
latency at batch 1 and 32 (median, all models interleaved in one loop) go into one table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.analysis.flops import layer_macs
from secateurs.outputs import logits_of
from secateurs.structured import prune_to_flops, taylor_importance
from secateurs.structured.blocks import count_parameters, prune_units_to_macs


def batches(images, labels, size, mean, std, shuffle, generator=None):
    order = torch.randperm(len(images), generator=generator) if shuffle else torch.arange(len(images))
    for i in range(0, len(images), size):
        idx = order[i:i + size]
        yield (images[idx].float() / 255 - mean) / std, labels[idx]


def logits(model, x):
    return logits_of(model(x))


def train(model, data, steps, lr, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    done = 0
    while done < steps:
        for x, y in batches(data["x"], data["y"], 128, data["mean"], data["std"], True, g):
            loss = F.cross_entropy(logits(model, x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    model.eval()


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    right = sum(int((logits(model, x).argmax(1) == y).sum())
                for x, y in batches(data["tx"], data["ty"], 500, data["mean"], data["std"], False))
    return 100.0 * right / len(data["tx"])


def macs(model, x):
    return sum(layer_macs(model, x).values())


@torch.no_grad()
def latency_ms(models, batch, repeats):
    x = torch.randn(batch, 1, 28, 28)
    times = {k: [] for k in models}
    for m in models.values():
        logits(m, x)
    for _ in range(repeats):
        for k, m in models.items():
            t = time.perf_counter()
            logits(m, x)
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


# -- the two pruners, on one schedule -----------------------------------------------------------
def secateurs_prune(model, kind, target, calib, x1, data, ft_steps, steps, seed):
    for k in range(1, steps + 1):
        goal = 1 - (1 - target) ** (k / steps)  # equal MAC ratio per step
        # MACs still to remove, relative to the current model
        share = 1 - (1 - goal) * data["dense_macs"] / macs(model, x1)
        if kind == "vit":
            model, _ = prune_units_to_macs(model, x1, share, importance="taylor", batches=calib)
        else:
            model, _ = prune_to_flops(model, x1, share,
                                      importance=lambda m, g: taylor_importance(m, g, calib))
        train(model, data, ft_steps, 5e-4, seed + k)
    return model


class Logits(nn.Module):
    """What Torch-Pruning needs to trace a model that returns a ModelOutput."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def _tp_pruner(tp, model, kind, ratio, x1, steps):
    wrapped = Logits(model)
    num_heads = {}
    if kind == "vit":
        for layer in model.vit.layers:
            a = layer.attention
            for p in (a.q_proj, a.k_proj, a.v_proj):
                num_heads[p] = a.num_attention_heads
    pruner = tp.pruner.MetaPruner(
        wrapped, x1, importance=tp.importance.TaylorImportance(), pruning_ratio=ratio,
        iterative_steps=steps, ignored_layers=[model.classifier], num_heads=num_heads,
        prune_num_heads=bool(num_heads), prune_head_dims=False, head_pruning_ratio=ratio,
    )
    return wrapped, pruner


def _tp_fix_heads(model, pruner, kind):
    if kind == "vit":
        for layer in model.vit.layers:
            a = layer.attention
            a.num_attention_heads = pruner.num_heads[a.q_proj]


def tp_ratio_for(tp, model, kind, target, x1, steps):
    """The Torch-Pruning channel ratio that removes ``target`` of the MACs after ``steps``
    iterative steps (bisected on copies pruned by magnitude, without fine-tuning: the MACs
    depend on the shapes only, and head counts round at every step)."""
    dense = macs(model, x1)
    lo, hi = 0.0, 0.95
    best = (0.0, 0.0)  # (ratio, MACs removed)
    for _ in range(12):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        _, pruner = _tp_pruner(tp, trial, kind, mid, x1, steps)
        pruner.importance = tp.importance.GroupMagnitudeImportance(p=1)
        for _ in range(steps):
            pruner.step()
            _tp_fix_heads(trial, pruner, kind)
        removed = 1 - macs(trial, x1) / dense
        if abs(removed - target) < abs(best[1] - target):
            best = (mid, removed)
        lo, hi = (mid, hi) if removed < target else (lo, mid)
    return best[0]


def tp_prune(tp, model, kind, target, calib, x1, data, ft_steps, steps, seed):
    ratio = tp_ratio_for(tp, model, kind, target, x1, steps)
    wrapped, pruner = _tp_pruner(tp, model, kind, ratio, x1, steps)
    for k in range(1, steps + 1):
        model.zero_grad()
        for x, y in calib:
            (F.cross_entropy(wrapped(x), y) / len(calib)).backward()
        pruner.step()
        _tp_fix_heads(model, pruner, kind)
        model.zero_grad()
        train(model, data, ft_steps, 5e-4, seed + k)
    return model


# -- the run --------------------------------------------------------------------------------------
def build(kind, smoke):
    import transformers

    if kind == "vit":
        config = transformers.ViTConfig(
            image_size=28, patch_size=4, num_channels=1, hidden_size=32 if smoke else 64,
            num_hidden_layers=2 if smoke else 4, num_attention_heads=4, intermediate_size=64 if smoke else 256,
            num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return transformers.ViTForImageClassification(config)
    config = transformers.MobileNetV2Config(num_channels=1, image_size=28, depth_multiplier=0.25 if smoke else 0.5,
                                            num_labels=10, classifier_dropout_prob=0.0)
    return transformers.MobileNetV2ForImageClassification(config)


def load(smoke):
    if smoke:  # random images: only the plumbing is checked
        g = torch.Generator().manual_seed(0)
        return {"x": torch.randint(0, 256, (512, 1, 28, 28), generator=g, dtype=torch.uint8),
                "y": torch.randint(0, 10, (512,), generator=g),
                "tx": torch.randint(0, 256, (256, 1, 28, 28), generator=g, dtype=torch.uint8),
                "ty": torch.randint(0, 10, (256,), generator=g), "mean": 0.5, "std": 0.25}
    from secateurs.data import load_dataset

    d = load_dataset("fashion-mnist")
    return {"x": d.train_images, "y": d.train_labels, "tx": d.test_images, "ty": d.test_labels,
            "mean": d.mean[0], "std": d.std[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=float, default=4.0, help="dense training epochs")
    p.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5], help="fractions of MACs to remove")
    p.add_argument("--models", nargs="+", default=["vit", "mobilenet_v2"], choices=["vit", "mobilenet_v2"])
    p.add_argument("--steps", type=int, default=3, help="prune / fine-tune steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny models and random data, seconds")
    p.add_argument("--out", default=None, help="directory for results.json and results.md (nothing written without it)")
    args = p.parse_args(argv)
    try:
        import torch_pruning as tp
    except ImportError:
        print("Torch-Pruning is the anchor of this benchmark: pip install torch-pruning==1.6.1", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    data = load(args.smoke)
    per_epoch = (len(data["x"]) + 127) // 128
    x1 = torch.zeros(1, 1, 28, 28)
    calib = list(batches(data["x"][:1024], data["y"][:1024], 128, data["mean"], data["std"], False))
    ft_steps = max(1, per_epoch // 3)
    rows, models = [], {}
    for kind in args.models:
        torch.manual_seed(args.seed)
        dense = build(kind, args.smoke)
        t0 = time.time()
        train(dense, data, max(1, round(args.epochs * per_epoch)), 2e-3, args.seed)
        data["dense_macs"] = macs(dense, x1)
        rows.append({"model": kind, "method": "dense", "target": 0.0, "acc": accuracy(dense, data),
                     "time_s": time.time() - t0})
        models[(kind, "dense", 0.0)] = dense
        for target in args.targets:
            for method in ("secateurs", "torch-pruning"):
                t0 = time.time()
                model = copy.deepcopy(dense)
                if method == "secateurs":
                    model = secateurs_prune(model, kind, target, calib, x1, data, ft_steps, args.steps, args.seed)
                else:
                    model = tp_prune(tp, model, kind, target, calib, x1, data, ft_steps, args.steps, args.seed)
                rows.append({"model": kind, "method": method, "target": target, "acc": accuracy(model, data),
                             "time_s": time.time() - t0})
                models[(kind, method, target)] = model
                print(f"{kind} {method} -{target:.0%}: {rows[-1]['acc']:.2f}%", flush=True)
    for row in rows:
        m = models[(row["model"], row["method"], row["target"])]
        row["params"] = count_parameters(m)
        row["macs"] = macs(m, x1)
        row["macs_removed"] = 1 - row["macs"] / macs(models[(row["model"], "dense", 0.0)], x1)
    with torch.no_grad():
        for b in (1, 32):
            lat = latency_ms({k: m.eval() for k, m in models.items()}, b, 5 if args.smoke else 30)
            for row in rows:
                row[f"ms_b{b}"] = lat[(row["model"], row["method"], row["target"])]
    lines = [
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}; seed {args.seed}; {'SMOKE: random data' if args.smoke else 'Fashion-MNIST'}",
        "",
        "| model | method | MACs removed | test acc. (%) | parameters | MACs | ms, batch 1 | ms, batch 32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['macs_removed']:.1%} | {r['acc']:.2f} | {r['params']:,} | "
                     f"{r['macs']:,} | {r['ms_b1']:.2f} | {r['ms_b32']:.2f} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
