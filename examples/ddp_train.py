"""Dynamic sparse training on several processes with DistributedDataParallel.

    torchrun --nproc_per_node 2 examples/ddp_train.py --method granet --sparsity 0.9
    torchrun --nproc_per_node 4 examples/ddp_train.py --dataset mnist --backend nccl   # GPUs

Each rank trains on its shard of every global batch; DDP averages the gradients, so every
rank's sparsifier sees the same weights and gradients and (with the same seed) decides the
same masks. ``Masks.sync_`` checks that after every update and raises, naming the rank, if
they ever differ. Rank 0 prints progress and the final sparsity.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from secateurs.data import load_dataset
from secateurs.methods import METHODS
from secateurs.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="granet", help="gmp, set, rigl, granet or ctre")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="lenet300_100")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--every", type=int, default=10, help="mask update interval in steps")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.backend == "nccl" else "cpu")
    data = load_dataset(args.dataset)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    x = (data.train_images.float() / 255.0 - mean) / std
    train = TensorDataset(x, data.train_labels.long())
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.global_batch // world, sampler=sampler, drop_last=True)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = create_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels,
                         image_size=data.image_size[0]).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    total = args.epochs * len(loader)
    kwargs = dict(sparsity=args.sparsity, total_steps=total, steps_per_epoch=len(loader), every=args.every, seed=args.seed)
    if args.method == "ctre":  # activations must come from the same batch on every rank
        kwargs["batches"] = lambda: DataLoader(train, batch_size=args.global_batch)
    sparsifier = METHODS.get(args.method)(ddp, optimizer, **kwargs)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            loss = F.cross_entropy(ddp(xb.to(device)), yb.to(device))
            optimizer.zero_grad()
            loss.backward()          # DDP all-reduces the gradients here
            optimizer.step()
            sparsifier.step()        # identical decisions on every rank, checked by sync_
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}, sparsity {sparsifier.sparsity:.4f}, "
                  f"mask updates so far {len(sparsifier.history)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
