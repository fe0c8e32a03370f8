"""``torchrun --nproc_per_node 2 -m secateurs train``: two CPU processes (gloo) train one run
data-parallel and match the same command run as one process."""
import json
import os
import subprocess
import sys

import torch
import yaml

from secateurs.train import load_checkpoint

CONFIG = {
    "name": "ddp",
    # 64 is even, the digits training set (1437) leaves a last batch of 29: an odd one, so the
    # uneven split of a batch (15 + 14 rows) is exercised too
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
    "model": {"name": "lenet300_100"},
    "train": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    # gmp prunes during training: masks change at many steps under DDP, each checked by sync_
    "prune": {"method": "gmp", "sparsities": [0.8], "params": {"every": 5, "end": "75%"}, "dense_baseline": True},
}


def _secateurs(args, nproc, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        command = [sys.executable, "-m", "secateurs", *args]
    else:  # --standalone: a local rendezvous on a free port
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "secateurs", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(process):
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _train(tmp_path, nproc):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    return _secateurs(["train", "--config", str(config), "--runs-dir", str(tmp_path / f"runs{nproc}"), "--no-progress"],
                      nproc, tmp_path)


def _finished(tmp_path, nproc, process):
    done = _wait(process)
    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = (tmp_path / f"runs{nproc}").iterdir()
    return run, done


def test_two_processes_match_one(tmp_path):
    (tmp_path / "one").mkdir()
    reference = _train(tmp_path / "one", 1)  # at the same time, in its own directory
    two, done = _finished(tmp_path, 2, _train(tmp_path, 2))
    one, _ = _finished(tmp_path / "one", 1, reference)
    assert done.stdout.count("run directory:") == 1, "only rank 0 prints"
    for phase in ("dense", "sparsity-0.8"):
        a, b = load_checkpoint(one / "checkpoints" / f"{phase}.pt"), load_checkpoint(two / "checkpoints" / f"{phase}.pt")
        # The weights agree up to float rounding, not bit for bit: one process sums a batch's
        # gradient over its 64 rows in one matmul, two processes over 32 + 32 and then add the
        # halves (and the last batch's 15 + 14), a different rounding order. 23 SGD steps with
        # momentum keep the difference near 1e-7 (measured: 3e-7 at most).
        for name, weight in a["model"].items():
            assert torch.allclose(weight, b["model"][name], rtol=0, atol=1e-5), (phase, name)
        assert a["train_state"] == b["train_state"]
        if phase != "dense":
            # The masks are exactly equal: the pruning decisions see weights that differ by
            # ~1e-7, far less than the gaps between magnitudes around the threshold here.
            masks_a, masks_b = a["sparsifier"]["masks"]["masks"], b["sparsifier"]["masks"]["masks"]
            assert masks_a.keys() == masks_b.keys()
            for name in masks_a:
                assert torch.equal(masks_a[name], masks_b[name]), name
    # rank 0 alone writes: each epoch logged once, results written once with both phases
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in lines] == [("dense", 1), ("sparsity-0.8", 1)]
    reference = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for mine, theirs in zip(lines, reference):  # the logged training loss and accuracy are global
        assert abs(mine["train_loss"] - theirs["train_loss"]) < 1e-5
        assert mine["train_acc"] == theirs["train_acc"]
    results = json.loads((two / "results.json").read_text())
    assert results["complete"] and [r["phase"] for r in results["levels"]] == ["dense", "sparsity-0.8"]
    assert results["levels"][1]["sparsity"] == json.loads((one / "results.json").read_text())["levels"][1]["sparsity"]
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(".") and p.name != ".lock") == []

    # resume: the results lose their last row, as if the run stopped after the phase's last
    # checkpoint; the same command again makes every rank load that checkpoint and finish
    results["complete"], results["levels"] = False, results["levels"][:1]
    (two / "results.json").write_text(json.dumps(results))
    again = _wait(_secateurs(["train", "--config", str(tmp_path / "ddp.yaml"), "--runs-dir", str(tmp_path / "runs2"),
                              "--no-progress"], 2, tmp_path))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("resumed sparsity-0.8 at epoch 1/1") == 1, again.stdout
    finished = json.loads((two / "results.json").read_text())
    assert finished["complete"] and finished["levels"][1]["test_acc"] == lines[-1]["test_acc"]
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 2


def test_batch_smaller_than_world_is_refused(tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    done = _wait(_secateurs(["train", "--config", str(config), "--runs-dir", str(tmp_path / "runs"), "--batch-size", "1"],
                            2, tmp_path))
    assert done.returncode != 0
    message = "data.batch_size is 1, smaller than the 2 processes training together"
    assert done.stderr.count(message) == 1, done.stderr  # printed once, by rank 0
    assert "torchrun --nproc_per_node 1" in done.stderr
    assert not (tmp_path / "runs").exists()
