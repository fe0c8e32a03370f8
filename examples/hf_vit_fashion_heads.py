"""A Hugging Face ViT trained on Fashion-MNIST, then pruned by whole attention heads and MLP
units (first-order Taylor, one shot, short fine-tune), measured side by side with the dense
model: accuracy, parameters, MACs and CPU latency at batch 1 and 32.

    python examples/hf_vit_fashion_heads.py --epochs 3 --out vit_fashion.json

The model is ``transformers.ViTForImageClassification`` built from a config (random init, no
download), passed to secateurs raw. Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
import transformers

from secateurs.analysis.flops import layer_macs
from secateurs.data import load_dataset
from secateurs.structured.blocks import count_parameters, prune_units


def batches(images, labels, size, mean, std, shuffle, generator=None):
    order = torch.randperm(len(images), generator=generator) if shuffle else torch.arange(len(images))
    for i in range(0, len(images), size):
        idx = order[i:i + size]
        yield (images[idx].float() / 255 - mean) / std, labels[idx]


def train(model, data, epochs, lr, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(data.train_images) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        for x, y in batches(data.train_images, data.train_labels, 128, MEAN, STD, True, g):
            loss = F.cross_entropy(model(x).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    correct = sum(int((model(x).logits.argmax(1) == y).sum())
                  for x, y in batches(data.test_images, data.test_labels, 500, MEAN, STD, False))
    return 100.0 * correct / len(data.test_images)


@torch.no_grad()
def latency_ms(models, batch, repeats=20):
    """Median ms per forward, the models interleaved so load changes hit all of them alike."""
    x = torch.randn(batch, 1, 28, 28)
    times = {k: [] for k in models}
    for m in models.values():
        m.eval()
        m(x)
    for _ in range(repeats):
        for k, m in models.items():
            t = time.perf_counter()
            m(x)
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--amounts", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    data = load_dataset("fashion-mnist")
    global MEAN, STD
    MEAN, STD = data.mean[0], data.std[0]
    config = transformers.ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=64,
                                    num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                    num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dense = transformers.ViTForImageClassification(config)
    t0 = time.time()
    train(dense, data, args.epochs, 2e-3, args.seed)
    rows = {"dense": {"acc": accuracy(dense, data), "train_s": time.time() - t0}}
    models = {"dense": dense}
    x1 = torch.zeros(1, 1, 28, 28)
    calib = list(batches(data.train_images[:2048], data.train_labels[:2048], 256, MEAN, STD, False))
    for amount in args.amounts:
        model = copy.deepcopy(dense)
        model.eval()  # Taylor scores without dropout noise
        prune_units(model, amount, importance="taylor", batches=calib)
        acc_pruned = accuracy(model, data)
        train(model, data, args.finetune_epochs, 5e-4, args.seed + 1)
        name = f"heads+mlp -{int(amount * 100)}%"
        rows[name] = {"acc_pruned": acc_pruned, "acc": accuracy(model, data)}
        models[name] = model
    for name, m in models.items():
        rows[name]["params"] = count_parameters(m)
        rows[name]["macs"] = sum(layer_macs(m, x1).values())
    for b in (1, 32):
        for name, ms in latency_ms(models, b).items():
            rows[name][f"latency_ms_b{b}"] = ms
    print(f"{'model':<16} {'acc %':>7} {'(pruned)':>9} {'params':>8} {'MACs':>9} {'ms b=1':>7} {'ms b=32':>8}")
    for name, r in rows.items():
        print(f"{name:<16} {r['acc']:7.2f} {r.get('acc_pruned', float('nan')):9.2f} {r['params']:8d} "
              f"{r['macs']:9d} {r['latency_ms_b1']:7.2f} {r['latency_ms_b32']:8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
