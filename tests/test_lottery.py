"""Lottery tickets: the IMP sparsifier (exact rounds, bit-exact rewinding) and the
resumable `secateurs lottery` experiment (controls, COLT, supermasks, bad input)."""
import copy
import json

import pytest
import torch
from torch import nn

from secateurs.allocation import keep_count
from secateurs.cli import main
from secateurs.errors import CheckpointError, ConfigError, UnknownNameError
from secateurs.experiments.lottery import aggregate_lottery, load_lottery_config, run_lottery, run_lottery_seeds
from secateurs.experiments.runs import RunDir
from secateurs.methods import LotteryTicket, criterion_masks
from secateurs.train import load_checkpoint


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))


def train_steps(model, opt, ticket, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 20, generator=g)
        y = torch.randint(0, 5, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ticket.step()


# -- the sparsifier ------------------------------------------------------------------------------
def test_layerwise_rounds_remove_exactly_the_rate_of_each_layers_remaining_weights():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ticket = LotteryTicket(model, opt, rate=0.2, output_rate=0.1)
    expected = {n: m.numel() for n, m in ticket.masks.masks.items()}
    rates = {"0.weight": 0.2, "2.weight": 0.2, "4.weight": 0.1}
    for _ in range(4):
        train_steps(model, opt, ticket, 5)
        ticket.next_round()
        expected = {n: keep_count(c, rates[n]) for n, c in expected.items()}
        assert ticket.masks.active() == expected
        for name, mask in ticket.masks.masks.items():  # pruned weights are zero in the model
            assert torch.all(dict(model.named_parameters())[name][~mask] == 0)


def test_global_rounds_keep_the_largest_weights_across_layers():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = LotteryTicket(model, opt, rate=0.5, scope="global", reset="keep")
    train_steps(model, opt, ticket, 3)
    weights = {n: w.detach().clone() for n, w in ticket.masks.weights().items()}
    ticket.next_round()
    total = sum(w.numel() for w in weights.values())
    assert sum(ticket.masks.active().values()) == total - round(0.5 * total)
    kept = torch.cat([weights[n][m].abs() for n, m in ticket.masks.masks.items()])
    dropped = torch.cat([weights[n][~m].abs() for n, m in ticket.masks.masks.items()])
    assert kept.min() >= dropped.max()


def test_rewind_to_init_restores_every_kept_weight_and_bias_bit_for_bit():
    model = mlp()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ticket = LotteryTicket(model, opt, rate=0.3)
    train_steps(model, opt, ticket, 10)
    ticket.next_round()
    for name, value in model.state_dict().items():
        expected = saved[name] * ticket.masks.masks[name] if name in ticket.masks.masks else saved[name]
        assert torch.equal(value, expected), name
    assert not opt.state  # every round starts with fresh optimizer state


def test_rewind_to_iteration_k_restores_the_weights_after_k_steps():
    reference = mlp()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    ref_ticket = LotteryTicket(reference, ref_opt, rate=0.3, rewind_step=4)
    train_steps(reference, ref_opt, ref_ticket, 4)
    at_k = {k: v.clone() for k, v in reference.state_dict().items()}

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ticket = LotteryTicket(model, opt, rate=0.3, rewind_step=4)
    train_steps(model, opt, ticket, 12)
    assert all(torch.equal(ticket.rewind_point[k], at_k[k]) for k in at_k)
    ticket.next_round()
    for name, value in model.state_dict().items():
        expected = at_k[name] * ticket.masks.masks[name] if name in ticket.masks.masks else at_k[name]
        assert torch.equal(value, expected), name
    assert ticket.round_steps == 4  # the next round continues the schedule from step k


def test_a_rewind_point_never_reached_is_a_clear_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = LotteryTicket(model, opt, rewind_step=50)
    train_steps(model, opt, ticket, 3)
    with pytest.raises(ConfigError, match="rewind point .step 50 of round 0. was never saved"):
        ticket.next_round()


def test_keep_reset_leaves_the_trained_weights():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = LotteryTicket(model, opt, rate=0.3, reset="keep")
    train_steps(model, opt, ticket, 5)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    ticket.next_round()
    for name, mask in ticket.masks.masks.items():
        assert torch.equal(model.state_dict()[name], trained[name] * mask)


def test_criterion_decides_what_a_round_keeps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ticket = LotteryTicket(model, opt, rate=0.5, criterion="magnitude_increase", reset="keep")
    init = {n: w.detach().clone() for n, w in ticket.masks.weights().items()}
    train_steps(model, opt, ticket, 5)
    final = {n: w.detach().clone() for n, w in ticket.masks.weights().items()}
    ticket.next_round()
    for name, mask in ticket.masks.masks.items():
        increase = final[name].abs() - init[name].abs()
        assert increase[mask].min() >= increase[~mask].max()


def test_state_round_trips_and_a_state_without_the_init_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = LotteryTicket(model, opt, rate=0.3)
    train_steps(model, opt, ticket, 3)
    ticket.next_round()
    state = ticket.state_dict()
    other = LotteryTicket(mlp(1), None, rate=0.3)
    other.load_state_dict(state)
    assert other.round == 1 and other.masks.active() == ticket.masks.active()
    assert all(torch.equal(other.rewind_point[k], v) for k, v in ticket.rewind_point.items())
    with pytest.raises(CheckpointError, match="no saved rewind point"):
        other.load_state_dict({**state, "rewind_point": None})
    wide = LotteryTicket(nn.Sequential(nn.Linear(20, 41), nn.ReLU(), nn.Linear(41, 5)), None)
    with pytest.raises(CheckpointError, match="another model"):
        wide.load_state_dict(state)


def test_bad_names_list_the_known_ones():
    with pytest.raises(UnknownNameError, match="large_final_same_sign"):
        LotteryTicket(mlp(), None, criterion="largest")
    with pytest.raises(UnknownNameError, match="signed_constant"):
        LotteryTicket(mlp(), None, init="zeros")
    with pytest.raises(ConfigError, match="scope='uniform' for per-layer rates"):
        LotteryTicket(mlp(), None, scope="global", output_rate=0.1)
    with pytest.raises(UnknownNameError, match="IMP scope 'erk' does not apply to IMP.*accepts the scopes uniform, global"):
        LotteryTicket(mlp(), None, scope="erk")
    with pytest.raises(UnknownNameError, match="IMP reset 'reinit' does not apply to LotteryTicket.*rewind, keep"):
        LotteryTicket(mlp(), None, reset="reinit")
    assert LotteryTicket(mlp(), None, scope="layerwise").imp_scope == "uniform"  # the old spelling still reads


def test_same_sign_supermask_keeps_only_weights_that_kept_their_sign():
    initial = {"w": torch.tensor([0.5, -0.4, 0.3, -0.2, 0.1, -0.6])}
    final = {"w": torch.tensor([0.9, 0.8, -0.7, -0.1, 0.2, -0.3])}
    masks = criterion_masks(initial, final, "large_final_same_sign", 0.5)
    # same sign: positions 0 (0.9), 3 (0.1), 4 (0.2), 5 (0.3): keep the three largest |w_f|
    assert masks["w"].tolist() == [True, False, False, False, True, True]


# -- the experiment -----------------------------------------------------------------------------
BASE = {
    "name": "lt",
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512, "validation": 200},
    "model": {"name": "lenet300_100"},
    "train": {"epochs": 2, "optimizer": {"name": "adam", "lr": 2e-3}, "eval_every": 5},
    "lottery": {"rounds": 2, "rate": 0.2, "output_rate": 0.1, "controls": ["reinit"],
                "reinit_distribution": "xavier_normal"},
}


def lottery(tmp_path, sub="runs", **overrides):
    config = load_lottery_config(None, {**copy.deepcopy(BASE), **overrides})
    run = RunDir.for_config(config, tmp_path / sub)
    return config, run, run_lottery(config, run, progress=False, echo=lambda s: None)


def test_imp_experiment_prunes_exactly_and_records_early_stopping(tmp_path):
    config, run, results = lottery(tmp_path)
    assert results["complete"] and [r["round"] for r in results["rounds"]] == [0, 1, 2]
    start = load_checkpoint(run.checkpoint("round-00-start"))
    numel = {n: m.numel() for n, m in start["sparsifier"]["masks"]["masks"].items()}
    rates = dict(zip(numel, (0.2, 0.2, 0.1)))  # hidden layers 20%, output layer 10%
    assert len(numel) == 3
    expected = dict(numel)
    for record in results["rounds"]:
        assert record["active"] == sum(expected.values())
        state = load_checkpoint(run.checkpoint(f"round-{record['round']:02d}"))
        assert {n: int(m.sum()) for n, m in state["sparsifier"]["masks"]["masks"].items()} == expected
        ticket = record["ticket"]
        assert ticket["steps"] == 2 * 20 and ticket["early_stop_step"] % 5 == 0
        assert 0 < ticket["test_acc"] <= 1
        expected = {n: keep_count(c, rates[n]) for n, c in expected.items()}
    # each round's ticket starts from the initial weights of round 0, masked
    init = start["model"]
    for r in (1, 2):
        state = load_checkpoint(run.checkpoint(f"round-{r:02d}-start"))
        for name, mask in state["sparsifier"]["masks"]["masks"].items():
            assert torch.equal(state["model"][name], init[name] * mask)
        # the control trains the same mask from other initial values
        control = load_checkpoint(run.checkpoint(f"round-{r:02d}-reinit"))
        ticket = load_checkpoint(run.checkpoint(f"round-{r:02d}"))
        for name, mask in ticket["sparsifier"]["masks"]["masks"].items():
            assert torch.equal(control["sparsifier"]["masks"]["masks"][name], mask)
    assert "reinit" in results["rounds"][1]["controls"]
    assert 0 < results["rounds"][2]["iou_with_previous"] < 1


def test_an_interrupted_lottery_resumes_without_repeating_a_round(tmp_path, monkeypatch):
    _, _, clean = lottery(tmp_path, "clean")
    original_log = RunDir.log
    calls = {"n": 0}

    def interrupting_log(self, record):
        original_log(self, record)
        calls["n"] += 1
        if record["phase"] == "round-01-reinit":  # killed mid-round, during the control
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        lottery(tmp_path, "broken")
    monkeypatch.setattr(RunDir, "log", original_log)
    config, run, resumed = lottery(tmp_path, "broken")
    logged = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    phases = [(r["phase"], r["epoch"]) for r in logged]
    assert phases.count(("round-00", 1)) == 1 and phases.count(("round-01", 2)) == 1  # nothing redone
    assert phases.count(("round-01-reinit", 1)) == 1  # its first epoch was checkpointed before the kill
    for a, b in zip(clean["rounds"], resumed["rounds"]):
        assert a["ticket"]["test_acc"] == b["ticket"]["test_acc"]
        assert a["ticket"]["early_stop_step"] == b["ticket"]["early_stop_step"]
        if a["round"] > 0:
            assert a["controls"]["reinit"]["test_acc"] == b["controls"]["reinit"]["test_acc"]


def test_resuming_with_another_config_or_without_the_saved_init_is_refused(tmp_path):
    config, run, _ = lottery(tmp_path, **{"lottery": {**BASE["lottery"], "rounds": 1}})
    changed = load_lottery_config(None, {**copy.deepcopy(BASE), "lottery": {**BASE["lottery"], "rounds": 1, "rate": 0.5}})
    with pytest.raises(ConfigError, match="different config"):
        run_lottery(changed, run, progress=False, echo=lambda s: None)
    (run.path / "results.json").unlink()
    (run.path / "rounds" / "round-01.json").unlink()
    run.checkpoint("round-01-start").unlink()
    run.checkpoint("round-01").unlink()
    run.checkpoint("round-00").unlink()
    with pytest.raises(CheckpointError, match="round-00.pt is missing"):
        run_lottery(config, run, progress=False, echo=lambda s: None)


def test_rewinding_beyond_training_or_unknown_names_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="beyond the training run of 40 steps"):
        lottery(tmp_path, **{"lottery": {**BASE["lottery"], "rewind": "3ep"}})
    with pytest.raises(UnknownNameError, match="large_final_same_sign"):
        load_lottery_config(None, {**copy.deepcopy(BASE), "lottery": {"criterion": "biggest"}})
    with pytest.raises(UnknownNameError, match="lr_rewind"):
        load_lottery_config(None, {**copy.deepcopy(BASE), "lottery": {"reset": "rewound"}})
    with pytest.raises(ConfigError, match="retrain_epochs"):
        load_lottery_config(None, {**copy.deepcopy(BASE), "lottery": {"reset": "finetune"}})


def test_late_rewinding_and_lr_rewinding_retrain_the_remaining_steps(tmp_path):
    for reset in ("rewind", "lr_rewind"):
        _, run, results = lottery(tmp_path, reset, **{"lottery": {**BASE["lottery"], "rewind": "10it", "reset": reset,
                                                                   "controls": []}})
        round1 = load_checkpoint(run.checkpoint("round-01"))
        assert round1["train_state"]["step"] == 40
        steps = [e["step"] for e in round1["evaluations"]]
        assert steps[0] == 15 and steps[-1] == 40  # evaluated only after step k = 10
        start = load_checkpoint(run.checkpoint("round-01-start"))
        after_round0 = load_checkpoint(run.checkpoint("round-00"))
        point = start["sparsifier"]["rewind_point"]
        name = next(iter(point))
        name = [n for n in start["sparsifier"]["masks"]["masks"]][0]
        mask = start["sparsifier"]["masks"]["masks"][name]
        if reset == "rewind":
            assert torch.equal(start["model"][name], point[name] * mask)
        else:  # learning-rate rewinding keeps the trained weights
            assert torch.equal(start["model"][name], after_round0["model"][name] * mask)


def test_finetune_and_linear_decay_retrain_for_retrain_epochs(tmp_path):
    _, run, _ = lottery(tmp_path, "ft", **{"lottery": {**BASE["lottery"], "reset": "finetune", "retrain_epochs": 1,
                                                       "controls": []},
                                            "train": {**BASE["train"], "lr_schedule": {"name": "multistep", "milestones": [1]}}})
    state = load_checkpoint(run.checkpoint("round-01"))
    assert state["train_state"]["step"] == 20
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-4)  # the final LR of the schedule
    _, run, _ = lottery(tmp_path, "lin", **{"lottery": {**BASE["lottery"], "reset": "linear_decay", "retrain_epochs": 1,
                                                        "controls": []}})
    state = load_checkpoint(run.checkpoint("round-01"))
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_colt_keeps_the_overlap_of_the_segment_tickets(tmp_path):
    _, run, results = lottery(tmp_path, **{"lottery": {"procedure": "colt", "rounds": 1, "rate": 0.3, "segments": 2}})
    assert set(results["rounds"][0]["segments"]) == {"0", "1"}
    masks = []
    for i in (0, 1):
        state = load_checkpoint(run.checkpoint(f"round-00-segment-{i}"))
        weights = {n: state["model"][n] for n in state["sparsifier"]["masks"]["masks"]}
        masks.append({n: w.abs() >= torch.quantile(w.abs().flatten().float(), 0.3) for n, w in weights.items()})
    start = load_checkpoint(run.checkpoint("round-01-start"))["sparsifier"]["masks"]["masks"]
    for name, mask in start.items():
        per_segment_keep = keep_count(mask.numel(), 0.3)
        assert int(mask.sum()) <= per_segment_keep  # the overlap is at most what one segment keeps
        assert torch.equal(mask, masks[0][name] & masks[1][name])


def test_supermask_rows_and_aggregate_outputs(tmp_path):
    overrides = {"lottery": {**BASE["lottery"], "rounds": 1,
                             "supermask": {"sparsities": [0.5], "criteria": ["large_final_same_sign", "random"]}}}
    config = load_lottery_config(None, {**copy.deepcopy(BASE), **overrides})
    summary = run_lottery_seeds(config, [0, 1], tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda s: None)
    assert summary["complete"] and len(summary["rounds"]) == 2
    assert summary["rounds"][1]["ticket"]["test_acc"]["n"] == 2
    rows = {(r["criterion"], r["init"]): r for r in summary["supermask"]}
    assert set(rows) == {(c, i) for c in ("large_final_same_sign", "random") for i in ("original", "signed_constant")}
    for name in ("lottery.json", "lottery.csv", "lottery.md", "accuracy_vs_remaining.png", "early_stop_vs_remaining.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # aggregating with a seed that never ran reports it missing instead of guessing
    partial = aggregate_lottery(config, [0, 7], tmp_path / "runs", tmp_path / "out2")
    assert not partial["complete"] and "seed 7 round 0" in partial["missing"]


def test_cli_lottery(tmp_path, capsys):
    path = tmp_path / "lt.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**copy.deepcopy(BASE), "seeds": [0]}))
    assert main(["lottery", "--config", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress",
                 "--set", "lottery.rounds=1", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| round | remaining (%)" in out and "reinit acc. at early stop" in out


def test_control_seeds_do_not_depend_on_the_process():
    import subprocess
    import sys

    code = "from secateurs.experiments.lottery import control_seed; print(control_seed(3, 2, 'reinit'))"
    seeds = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": str(h)}).stdout.strip()
        for h in (1, 2)
    }
    assert len(seeds) == 1


def test_reset_names_come_from_the_one_vocabulary():
    with pytest.raises(UnknownNameError, match=r"lottery.reset 'keep' does not apply to secateurs lottery.*use finetune or lr_rewind"):
        load_lottery_config(None, {"lottery": {"reset": "keep"}})
    with pytest.raises(UnknownNameError, match=r"unknown lottery.reset 'rewnd'; secateurs lottery \(lottery.reset\) accepts"):
        load_lottery_config(None, {"lottery": {"reset": "rewnd"}})
    with pytest.raises(UnknownNameError, match="lottery.scope 'erk' does not apply to IMP"):
        load_lottery_config(None, {"lottery": {"scope": "erk"}})


def test_a_ticket_saved_with_the_old_scope_name_resumes():
    model = mlp()
    state = LotteryTicket(model, None).state_dict()
    state["plan"]["imp_scope"] = "layerwise"  # as saved before 'layerwise' became 'uniform'
    LotteryTicket(mlp(), None).load_state_dict(state)
    state["plan"]["imp_scope"] = "global"
    with pytest.raises(CheckpointError, match="another plan"):
        LotteryTicket(mlp(), None).load_state_dict(state)
