"""One epoch of MNIST batches: the in-memory loader vs. torch's DataLoader, in one run.

Both produce shuffled, normalized float batches of 128 from the same 60k images; the
DataLoader gets a TensorDataset of pre-normalized floats (its best case with no workers).
Rounds are interleaved; the median is reported.

Run: ``python benchmarks/bench_loader.py [--out FILE]``; nothing is written without ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from secateurs.data import BatchTransform, InMemoryLoader, load_dataset


def epoch_seconds(loader) -> float:
    start = time.perf_counter()
    for x, y in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file (default: print them, write nothing)")
    args = parser.parse_args()
    ds = load_dataset("mnist")
    transform = BatchTransform(mean=ds.mean, std=ds.std)
    ours = InMemoryLoader(ds.train_images, ds.train_labels, 128, transform=transform, seed=0)
    floats = transform(ds.train_images, None)
    theirs = DataLoader(TensorDataset(floats, ds.train_labels), batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    times = {"secateurs InMemoryLoader": [], "torch DataLoader(TensorDataset)": []}
    for _ in range(5):
        times["secateurs InMemoryLoader"].append(epoch_seconds(ours))
        times["torch DataLoader(TensorDataset)"].append(epoch_seconds(theirs))
    median = {k: statistics.median(v) for k, v in times.items()}
    base = median["secateurs InMemoryLoader"]
    lines = ["| MNIST epoch, batch 128, shuffled | seconds | vs. in-memory |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {v / base:.1f}x |" for k, v in median.items()]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"median_s": median, "markdown": table}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
