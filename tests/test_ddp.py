"""Dynamic sparse training under DistributedDataParallel (2 CPU processes, gloo).

Mask decisions must come out bit-identical on every rank, and identical to one process
training on the whole global batch: gradients are DDP-averaged and random draws share one
seed. ``Masks.sync_`` checks this after every update and must name the rank that disagrees.

The model is float64 so that the ~1e-16 difference between "mean of two half-batch means"
and "mean of the full batch" is far too small to flip a top-k selection.

Spawned children import this module, so everything they run is a top-level function.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from secateurs.errors import SparsityMismatchError
from secateurs.methods import SET, GraNet, RigL

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD = 2
METHODS = ("set", "rigl", "granet")
STEPS = 30
GLOBAL_BATCH = 32
JOIN_TIMEOUT_S = 120  # a deadlocked collective must fail the test, not hang it


# -- shared by the children and the single-process reference ------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    ).double()


def _data(n: int = 256):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 20, generator=g, dtype=torch.float64)
    return x, x[:, :5].argmax(1)


def _sparsifier(method: str, model, opt, seed: int = 0):
    common = dict(total_steps=STEPS, every=5, seed=seed)
    if method == "set":
        return SET(model, opt, sparsity=0.7, **common)
    if method == "rigl":
        return RigL(model, opt, sparsity=0.7, **common)
    if method == "granet":  # dense-to-sparse: prunes at 5/10/15, swaps at 5..25
        return GraNet(model, opt, sparsity=0.8, initial_sparsity=0.0, end="50%", **common)
    raise AssertionError(method)


def _snapshot(sp, step: int, new_records: list[dict]) -> dict:
    return {
        "step": step,
        "kinds": [h["kind"] for h in new_records],
        "masks": {n: m.detach().cpu().clone() for n, m in sp.masks.masks.items()},
    }


def _train(method: str, model, *, rank: int = 0, world: int = 1) -> dict:
    """Train ``model`` (plain or DDP-wrapped) on this rank's share of every global batch and
    snapshot the masks after every mask update (one snapshot per step that updated)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = _sparsifier(method, model, opt)
    snaps = [_snapshot(sp, 0, sp.history)] if sp.history else []
    seen = len(sp.history)
    x, y = _data()
    share = GLOBAL_BATCH // world
    for s in range(STEPS):
        start = (s * GLOBAL_BATCH) % len(x) + rank * share
        xb, yb = x[start:start + share], y[start:start + share]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        if len(sp.history) > seen:
            snaps.append(_snapshot(sp, s + 1, sp.history[seen:]))
            seen = len(sp.history)
    weights = {n: p.detach().cpu().clone() for n, p in sp.masks.params.items()}
    return {"snapshots": snaps, "weights": weights, "history": sp.history}


# -- children -----------------------------------------------------------------------------
def _init_group(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no dependence on hostname resolution
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=30),
    )


def _outcome(fn) -> dict:
    """Run ``fn``; report whether it raised SparsityMismatchError and with which message."""
    try:
        where = fn()
    except SparsityMismatchError as e:
        return {"raised": True, "message": str(e), "traceback": traceback.format_exc()}
    return {"raised": False, "where": where}


def _sync_recording_state(sp, out: dict, key: str) -> str:
    """``sp.masks.sync_()``, recording in ``out[key]`` whether it left this rank's masks as
    they were (a raising sync must not half-apply anything)."""
    before = {n: m.clone() for n, m in sp.masks.masks.items()}
    try:
        sp.masks.sync_()
    finally:
        out[key] = all(torch.equal(before[n], sp.masks[n]) for n in before)
    return "sync_"


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Every scenario in one process group: each spawn costs seconds (importing torch, and
    torch._dynamo on the first DDP construction), the scenarios themselves milliseconds.
    An unexpected exception kills this child, and the parent fails with its traceback."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init_group(rank, world, init_file)
    out: dict = {"world_size": dist.get_world_size()}
    try:
        for method in METHODS:
            out[method] = _train(method, DDP(_mlp()), rank=rank, world=world)

        # 1. different constructor seeds: the initial random ERK masks differ
        def different_seeds():
            model = DDP(_mlp())
            _sparsifier("set", model, torch.optim.SGD(model.parameters(), lr=0.1), seed=rank)
            return "constructor"

        out["seeds"] = _outcome(different_seeds)

        # 2. same initial masks, then SET's random regrowth draws differ at the first swap
        def different_regrowth():
            model = DDP(_mlp())
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            sp = _sparsifier("set", model, opt, seed=0)
            sp.generator.manual_seed(100 + rank)
            x, y = _data()
            for s in range(STEPS):
                loss = F.cross_entropy(model(x[16 * rank:16 * rank + 16]), y[16 * rank:16 * rank + 16])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sp.step()
                if sp.history[-1]["kind"] == "swap":
                    return f"no error after the swap at step {s + 1}"
            return "no swap happened"

        out["regrowth"] = _outcome(different_regrowth)

        # 3. identical masks except one moved connection on rank 1 (same count per layer)
        def corrupted():
            sp = _sparsifier("set", _mlp(), None, seed=0)  # no DDP needed: sync_ is the collective
            before = {n: m.clone() for n, m in sp.masks.masks.items()}
            sp.masks.sync_()  # agreeing ranks: a no-op on the masks
            assert all(torch.equal(before[n], sp.masks[n]) for n in before)
            if rank == 1:
                m = sp.masks.masks["2.weight"].view(-1)
                on, off = int(m.nonzero()[0]), int((~m).nonzero()[0])
                m[on], m[off] = False, True
            return _sync_recording_state(sp, out, "corrupted_state_kept")

        out["corrupted"] = _outcome(corrupted)

        # 4. a disagreement that per-layer (count, sum of indices, sum of squared indices)
        #    fingerprints cannot see: active {1, 5, 6} vs {2, 3, 7} (equal counts, sums 12,
        #    sums of squares 62), the rest identical
        def same_power_sums():
            sp = _sparsifier("set", _mlp(), None, seed=0)
            m = sp.masks.masks["2.weight"].view(-1)
            m[:8] = False
            m[[1, 5, 6] if rank == 0 else [2, 3, 7]] = True
            return _sync_recording_state(sp, out, "same_power_sums_state_kept")

        out["same_power_sums"] = _outcome(same_power_sums)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- parent -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run :func:`_worker` in WORLD spawned processes (once for the module) and return each
    rank's saved results; a child's exception or a hang fails the tests that use it."""
    import torch.multiprocessing as mp

    tmp_path = tmp_path_factory.mktemp("ddp")
    init_file = tmp_path / "rendezvous"  # must not exist yet
    ctx = mp.start_processes(
        _worker, args=(WORLD, str(init_file), str(tmp_path)), nprocs=WORLD,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    failure = None
    try:
        while failure is None and not ctx.join(timeout=0.1):
            if time.monotonic() > deadline:
                failure = f"DDP workers still running after {JOIN_TIMEOUT_S}s (a deadlocked collective?)"
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        # join() has already terminated the other rank; e carries the child's traceback
        failure = f"a DDP worker failed:\n{e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same_masks(a: list[dict], b: list[dict], what: str) -> None:
    assert [s["step"] for s in a] == [s["step"] for s in b], f"{what}: updates at different steps"
    assert [s["kinds"] for s in a] == [s["kinds"] for s in b], f"{what}: different update kinds"
    for sa, sb in zip(a, b):
        for name in sa["masks"]:
            assert torch.equal(sa["masks"][name], sb["masks"][name]), (
                f"{what}: masks of {name} differ after the update at step {sa['step']} ({sa['kinds']})"
            )


@pytest.mark.parametrize("method", METHODS)
def test_ddp_masks_match_across_ranks_and_single_process(method, ranks):
    assert [r["world_size"] for r in ranks] == [WORLD] * WORLD
    results = [r[method] for r in ranks]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train(method, _mlp())  # no process group: the full global batch
    finally:
        torch.set_num_threads(threads)

    snaps0, snaps1, ref = results[0]["snapshots"], results[1]["snapshots"], single["snapshots"]
    assert len(ref) >= 4, f"too few mask updates to test: {[s['step'] for s in ref]}"
    _assert_same_masks(snaps0, snaps1, "rank 0 vs rank 1")
    _assert_same_masks(snaps0, ref, "DDP vs single process")
    assert results[0]["history"] == results[1]["history"] == single["history"]

    # DDP-averaged float64 gradients: the weights track the single-process run closely
    for name, w in single["weights"].items():
        torch.testing.assert_close(results[0]["weights"][name], w, rtol=1e-9, atol=1e-12)
        assert torch.equal(results[0]["weights"][name], results[1]["weights"][name])

    # not vacuous: a pure swap update moved connections (and kept every layer's count)
    moved = []
    for prev, cur in zip(ref, ref[1:]):
        if cur["kinds"] == ["swap"]:
            for name, m in cur["masks"].items():
                assert int(m.sum()) == int(prev["masks"][name].sum()), "a swap changed a layer's count"
            changed = sum(int((m != prev["masks"][n]).sum()) for n, m in cur["masks"].items())
            if changed:
                moved.append((cur["step"], changed))
    assert moved, f"{method}: no swap changed the masks; the comparison would be vacuous"
    if method == "granet":
        kinds = [k for s in ref for k in s["kinds"]]
        assert "prune" in kinds and "swap" in kinds


def test_ddp_mask_disagreement_is_caught_on_every_rank(ranks):
    for scenario in ("seeds", "regrowth", "corrupted", "same_power_sums"):
        for r, out in enumerate(ranks):
            res = out[scenario]
            assert res["raised"], f"{scenario}: rank {r} raised no SparsityMismatchError ({res.get('where')})"
            assert "rank(s) [1] disagree with rank 0" in res["message"], f"{scenario}, rank {r}: {res['message']}"
        assert ranks[0][scenario]["message"] == ranks[1][scenario]["message"]
    for scenario in ("corrupted", "same_power_sums"):
        assert "on 2.weight;" in ranks[0][scenario]["message"]  # names only the corrupted layer
        assert all(r[f"{scenario}_state_kept"] for r in ranks), f"{scenario}: a failed sync_ changed the masks"
    # the regrowth disagreement is caught at the swap, from sparsifier.step()
    assert "in step" in ranks[0]["regrowth"]["traceback"] and "_swap" in ranks[0]["regrowth"]["traceback"]
