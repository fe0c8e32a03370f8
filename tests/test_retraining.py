"""Retraining schedules of IMP (Zimmer, Spiegel & Pokutta, ICLR 2023): SLR, CLR, LLR and ALLR
against their formulas computed by hand, budgeted IMP's split of its epochs, and tiny lottery
runs with each new reset that resume bit for bit after an interruption."""
import copy
import json
import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from secateurs.errors import ConfigError, UnknownNameError
from secateurs.experiments.lottery import (allr_lr, bimp_epochs, load_lottery_config, retraining_schedule,
                                           run_lottery)
from secateurs.experiments.runs import RunDir
from secateurs.train import build_lr_schedule, load_checkpoint
from secateurs.train.config import LRScheduleConfig


def lrs_of(reset, dense_lrs, dense_warmup, epochs, spe, lr=None):
    """The learning rate at each step of a retraining, as the trainer would step it."""
    peak, schedule, factor = retraining_schedule(reset, dense_lrs, dense_warmup, epochs, spe, lr)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = LambdaLR(opt, [factor]) if factor else build_lr_schedule(opt, LRScheduleConfig(**schedule), spe, epochs)
    out = []
    for _ in range(epochs * spe):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_slr_compresses_the_dense_schedule_after_a_tenth_of_warmup():
    # dense: 6 steps, 1 warm-up step at 0.05, then 0.1 x3, then 0.01 x2; retraining 10 epochs x 3 steps
    dense = [0.05, 0.1, 0.1, 0.1, 0.01, 0.01]
    lrs = lrs_of("slr", dense, 1, 10, 3)
    # N = 30, W = round(0.1 * 30) = 3, R = 27; warm-up: 0.1 * (t + 1) / 3
    assert lrs[0] == pytest.approx(0.1 / 3) and lrs[1] == pytest.approx(0.2 / 3) and lrs[2] == pytest.approx(0.1)
    # t >= 3: dense'[floor((t - 3) * 6 / 27)], the dense warm-up step read as max_lr
    assert lrs[3] == pytest.approx(0.1)     # j = 0 -> index 0 (warm-up step -> 0.1, not 0.05)
    assert lrs[20] == pytest.approx(0.1)    # j = 17 -> floor(102 / 27) = 3
    assert lrs[21] == pytest.approx(0.01)   # j = 18 -> floor(108 / 27) = 4
    assert lrs[29] == pytest.approx(0.01)   # j = 26 -> floor(156 / 27) = 5


def test_clr_is_one_cosine_from_the_largest_to_the_smallest_dense_rate():
    dense = [0.1] * 4 + [0.001] * 4
    lrs = lrs_of("clr", dense, 0, 10, 2)  # N = 20, W = 2, R = 18
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)
    for t in (2, 7, 11, 19):
        by_hand = 0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * (t - 2) / 18)) / 2
        assert lrs[t] == pytest.approx(by_hand, rel=1e-6), t
    assert lrs[11] == pytest.approx(0.0505)


def test_llr_and_allr_decay_linearly_from_their_peak():
    dense = [0.2] * 5 + [0.02] * 5
    for reset, peak in (("llr", 0.2), ("allr", 0.07)):
        lrs = lrs_of(reset, dense, 0, 5, 4, lr=0.07)  # N = 20, W = 2, R = 18
        assert lrs[0] == pytest.approx(peak / 2)
        for t in (2, 10, 19):
            assert lrs[t] == pytest.approx(peak * (1 - (t - 2) / 18)), (reset, t)


def test_allr_initial_value_by_hand():
    # d / sqrt(s) = 0.3 / 0.6 = 0.5 -> 0.05, inside [2/10 * 0.1, 0.1]
    assert allr_lr(0.1, 0.3, 0.36, 2, 10) == pytest.approx(0.05)
    assert allr_lr(0.1, 0.01, 0.36, 2, 10) == pytest.approx(0.02)  # clipped up to the budget's share
    assert allr_lr(0.1, 0.9, 0.36, 2, 10) == pytest.approx(0.1)    # clipped down to max_lr
    assert allr_lr(0.1, 0.01, 0.36, 20, 10) == pytest.approx(0.1)  # retraining as long as training: LLR


def test_bimp_splits_the_budget_and_refuses_one_that_cannot_fit():
    assert bimp_epochs(20, 5, 4) == [5, 3, 3, 3, 6]
    assert bimp_epochs(17, 5, 4) == [5, 3, 3, 3, 3]
    for budget, dense, rounds in ((20, 5, 4), (17, 5, 4), (9, 2, 7), (100, 30, 9)):
        split = bimp_epochs(budget, dense, rounds)
        assert sum(split) == budget and len(split) == rounds + 1 and min(split[1:]) >= 1
    with pytest.raises(ConfigError, match=r"lottery.budget=6 epochs cannot fit 2 pruning round.*at least 7"):
        bimp_epochs(6, 5, 2)


BASE = {
    "name": "rt",
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512, "validation": 200},
    "model": {"name": "lenet300_100"},
    "train": {"epochs": 4, "optimizer": {"name": "sgd", "lr": 0.05},
              "lr_schedule": {"name": "multistep", "milestones": [2], "gamma": 0.1}},
    "lottery": {"rounds": 2, "rate": 0.5, "retrain_epochs": 2},
}


def config_for(reset, **lottery):
    data = copy.deepcopy(BASE)
    data["lottery"].update(reset=reset, **lottery)
    return load_lottery_config(None, data)


def test_bad_budgets_and_resets_are_refused_before_training():
    with pytest.raises(ConfigError, match=r"lottery.budget=5 epochs cannot fit 2 pruning round.*train.epochs"):
        config_for("allr", retrain_epochs=None, budget=5)
    with pytest.raises(ConfigError, match="replays the dense schedule; use one of"):
        config_for("lr_rewind", retrain_epochs=None, budget=10)
    with pytest.raises(ConfigError, match="keep one"):
        config_for("allr", budget=10)
    with pytest.raises(ConfigError, match="set lottery.retrain_epochs"):
        config_for("slr", retrain_epochs=None)
    with pytest.raises(UnknownNameError, match="llr, slr, clr, allr"):
        config_for("sllr")


def run(config, tmp_path, sub):
    rd = RunDir.for_config(config, tmp_path / sub)
    return rd, run_lottery(config, rd, progress=False, echo=lambda s: None)


@pytest.mark.parametrize("reset", ["slr", "clr", "llr", "allr"])
def test_each_new_reset_runs_and_resumes_bit_for_bit(tmp_path, monkeypatch, reset):
    config = config_for(reset)
    clean_run, clean = run(config, tmp_path, "clean")
    original_log = RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if record["phase"] == "round-02" and record.get("epoch") == 1:  # killed mid-retraining
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path, "broken")
    monkeypatch.setattr(RunDir, "log", original_log)
    broken_run, resumed = run(config, tmp_path, "broken")
    logged = [json.loads(line) for line in broken_run.metrics_path.read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in logged].count(("round-02", 1)) == 1  # resumed after epoch 1
    for name in ("round-01", "round-02"):
        a, b = load_checkpoint(clean_run.checkpoint(name)), load_checkpoint(broken_run.checkpoint(name))
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert [r["ticket"]["test_acc"] for r in clean["rounds"]] == [r["ticket"]["test_acc"] for r in resumed["rounds"]]
    retrain = clean["rounds"][1]["retrain"]
    assert retrain["epochs"] == 2 and retrain["warmup_epochs"] == pytest.approx(0.2)
    state = load_checkpoint(clean_run.checkpoint("round-01"))
    last_lr = state["optimizer"]["param_groups"][0]["lr"]
    # the learning rate the last step used: SLR ends at the dense schedule's last rate, CLR at its
    # smallest, LLR / ALLR one step short of 0
    if reset == "slr":
        assert retrain["lr"] == pytest.approx(0.05) and retrain["lr_schedule"] == "slr"
        assert last_lr == pytest.approx(0.005)
    if reset == "clr":
        assert retrain["lr"] == pytest.approx(0.05) and last_lr == pytest.approx(0.005, rel=1e-3)
    if reset == "llr":
        assert retrain["lr"] == pytest.approx(0.05)
    if reset == "allr":
        # ALLR's inputs from the checkpoints: the trained round-0 network and round 1's pruned start
        trained = load_checkpoint(clean_run.checkpoint("round-00"))
        start = load_checkpoint(clean_run.checkpoint("round-01-start"))
        params = [n for n in trained["model"] if "running" not in n and "num_batches" not in n]
        full = sum(float(trained["model"][n].double().pow(2).sum()) for n in params)
        kept = sum(float(start["model"][n].double().pow(2).sum()) for n in params)
        before = sum(int(m.sum()) for m in trained["sparsifier"]["masks"]["masks"].values())
        after = sum(int(m.sum()) for m in start["sparsifier"]["masks"]["masks"].values())
        d, s = math.sqrt(full - kept) / math.sqrt(full), 1 - after / before
        assert retrain["relative_norm_drop"] == pytest.approx(d) and retrain["pruned_share"] == pytest.approx(s)
        assert retrain["lr"] == pytest.approx(min(max(0.05 * d / math.sqrt(s), 0.05 * 2 / 4), 0.05))


def test_bimp_run_trains_each_round_its_share_of_the_budget(tmp_path):
    config = config_for("allr", retrain_epochs=None, budget=7)  # dense 4 epochs, then 1 + 2
    rd, results = run(config, tmp_path, "bimp")
    assert [r["retrain"]["epochs"] for r in results["rounds"][1:]] == [1, 2]
    steps = [load_checkpoint(rd.checkpoint(f"round-{r:02d}"))["train_state"]["step"] for r in range(3)]
    assert steps[1] * 4 == steps[0] == steps[2] * 2  # four epochs, then one, then two
