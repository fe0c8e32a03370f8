"""End-to-end: configs, run directories, resume after interruption, reports, the CLI."""

import pytest
import torch
import yaml

from secateurs.allocation import keep_count
from secateurs.cli import main
from secateurs.errors import CheckpointError, ConfigError, NonFiniteLossError
from secateurs.experiments import RunDir, load_config
from secateurs.experiments.sweep import run_sweep
from secateurs.experiments.runs import RunDir as _RunDir
from secateurs.train import load_checkpoint

TINY = {
    "name": "tiny",
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
    "model": {"name": "lenet300_100"},
    "train": {"epochs": 3, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "prune": {"sparsities": [0.5, 0.9]},
    "finetune": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9}},
}


def write_config(tmp_path, data=TINY, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run_tiny(tmp_path, sub="runs", **overrides):
    config = load_config(write_config(tmp_path), overrides)
    run = RunDir.for_config(config, tmp_path / sub)
    return config, run, run_sweep(config, run, progress=False, echo=lambda s: None)


def weights(path):
    return load_checkpoint(path)["model"]


def test_end_to_end_exact_sparsity_and_files(tmp_path):
    config, run, results = run_tiny(tmp_path)
    assert results["complete"]
    rows = {r["phase"]: r for r in results["levels"]}
    assert rows["dense"]["test_acc"] > 0.9
    for target in (0.5, 0.9):
        row = rows[f"sparsity-{target:g}"]
        assert row["active"] == keep_count(row["numel"], target)
        state = load_checkpoint(run.checkpoint(f"sparsity-{target:g}"))
        masks = state["sparsifier"]["masks"]["masks"]
        for name, mask in masks.items():
            assert torch.count_nonzero(state["model"][name][~mask]) == 0, "pruned weights must stay zero"
    for name in ("config.yaml", "metrics.jsonl", "results.json"):
        assert (run.path / name).is_file()
    phases = {r["phase"] for r in run.metrics()}
    assert phases == {"dense", "sparsity-0.5", "sparsity-0.9"}
    assert main(["report", str(run.path)]) == 0
    assert (run.path / "accuracy_vs_sparsity.png").stat().st_size > 1000
    assert (run.path / "layer_sparsity.png").stat().st_size > 1000
    assert "sparsity-0.9" in (run.path / "results.csv").read_text()


@pytest.mark.parametrize("stop_at", [("dense", 2), ("sparsity-0.9", 1)])
def test_interrupted_run_resumes_bit_identically(tmp_path, monkeypatch, stop_at):
    _, ref_run, ref = run_tiny(tmp_path, "ref")

    original_log = _RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if (record["phase"], record["epoch"]) == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(_RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path, "cut")
    monkeypatch.setattr(_RunDir, "log", original_log)
    messages = []
    config = load_config(write_config(tmp_path))
    run = RunDir.for_config(config, tmp_path / "cut")
    resumed = run_sweep(config, run, progress=False, echo=messages.append)
    assert any(m.startswith(f"resumed {stop_at[0]}") for m in messages)
    assert [r["test_acc"] for r in resumed["levels"]] == [r["test_acc"] for r in ref["levels"]]
    assert [r["acc_before_finetune"] for r in resumed["levels"]] == [r["acc_before_finetune"] for r in ref["levels"]]
    a, b = weights(run.checkpoint("sparsity-0.9")), weights(ref_run.checkpoint("sparsity-0.9"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_is_reused_not_recomputed(tmp_path):
    _, run, _ = run_tiny(tmp_path)
    before = run.results_path.stat().st_mtime_ns
    messages = []
    config = load_config(write_config(tmp_path))
    run_sweep(config, RunDir.for_config(config, tmp_path / "runs"), progress=False, echo=messages.append)
    assert messages == [f"reusing finished run {run.path}"]
    assert run.results_path.stat().st_mtime_ns == before


def test_run_names_follow_the_non_default_config():
    a = load_config(None, {"name": "x", "train.epochs": 3})
    assert a.run_name() == load_config(None, {"name": "x", "train.epochs": 3}).run_name()
    assert a.run_name() != load_config(None, {"name": "x", "train.epochs": 4}).run_name()
    # spelling out a default value does not rename the run
    assert a.run_name() == load_config(None, {"name": "x", "train.epochs": 3, "seed": 0}).run_name()
    assert a.run_name().startswith("x-")


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--method", "snap"], "unknown method 'snap'; known methods: "),
        (["--model", "resnet21"], "unknown model 'resnet21'; known models:"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'; known datasets:"),
        (["--sparsity", "1.0"], "must be in [0, 1)"),
        (["--sparsity", "-0.2"], "must be in [0, 1)"),
        (["--scope", "layer"], "unknown prune.scope 'layer'"),
        (["--set", "train.epoch=3"], "unknown config key(s) train.epoch"),
        (["--set", "prune.sparsities=[0.9, 0.5]"], "must increase"),
    ],
)
def test_bad_input_gives_one_clear_error(tmp_path, capsys, flags, expected):
    code = main(["train", "--config", str(write_config(tmp_path)), "--runs-dir", str(tmp_path / "r"), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1, "one line, no traceback"
    assert not list((tmp_path / "r").glob("*/config.yaml")), "bad input must not create a run directory"


def test_missing_dataset_files_name_what_is_expected(tmp_path, capsys):
    code = main(["train", "--config", str(write_config(tmp_path)), "--dataset", "fashion-mnist",
                 "--data-root", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "train-images-idx3-ubyte" in err
    assert not list((tmp_path / "r").glob("*/config.yaml"))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = load_config(write_config(tmp_path), {"finetune.optimizer.lr": 1e30})
    run = RunDir.for_config(config, tmp_path / "runs")
    with pytest.raises(NonFiniteLossError, match=r"step \d+") as error:
        run_sweep(config, run, progress=False, echo=lambda s: None)
    assert "dense.pt" in str(error.value), "the message points at the checkpoints that are kept"
    dense = load_checkpoint(run.checkpoint("dense"))
    assert all(torch.isfinite(v).all() for v in dense["model"].values())
    assert not run.checkpoint("sparsity-0.5").exists(), "no checkpoint is written from a diverged epoch"
    assert not run.results()["complete"]


def test_corrupted_checkpoint_is_an_error_and_is_not_overwritten(tmp_path, monkeypatch):
    original_log = _RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if record["phase"] == "sparsity-0.5":
            raise KeyboardInterrupt

    monkeypatch.setattr(_RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path)
    monkeypatch.setattr(_RunDir, "log", original_log)
    config = load_config(write_config(tmp_path))
    run = RunDir.for_config(config, tmp_path / "runs")
    ckpt = run.checkpoint("sparsity-0.5")
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="sparsity-0.5.pt"):
        run_sweep(config, run, progress=False, echo=lambda s: None)
    assert ckpt.stat().st_size == 1000


def test_checkpoint_from_another_model_is_refused(tmp_path):
    _, run, _ = run_tiny(tmp_path)
    other = load_config(write_config(tmp_path), {"model.name": "mlp"})
    other_run = RunDir.for_config(other, tmp_path / "runs")
    other_run.bind(other)
    other_run.checkpoints.mkdir(parents=True)
    (other_run.checkpoint("dense")).write_bytes(run.checkpoint("dense").read_bytes())
    with pytest.raises(CheckpointError, match="different model|missing|unexpected|shape"):
        run_sweep(other, other_run, progress=False, echo=lambda s: None)


def test_cli_help_and_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("train", "report", "list", "lottery", "structured"))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("magnitude", "random", "lenet300_100", "resnet20", "mnist", "cifar10", "erk", "cubic",
                 "large_final_same_sign", "signed_constant", "lr_rewind", "taylor2", "nm",
                 "transformers.pytorch_utils.Conv1D", "qkvo_attention", "gated_mlp"):
        assert name in out
    # each table a config reaches, with its key; the scopes and resets once, with their meanings
    for line in ("methods (prune.method):", "models (model.name):", "datasets (data.dataset):",
                 "regrowth rules (prune.params.regrowth of granet, rigl, set):",
                 "scopes (prune.scope, lottery.scope, lottery.supermask.scope, structured.scope):",
                 "resets (prune.reset, lottery.reset):", "  IMP (lottery.scope, LotteryTicket): uniform, global",
                 "  secateurs lottery (lottery.reset): rewind, lr_rewind, finetune, linear_decay, llr, slr, clr, allr"):
        assert line in out.splitlines(), line
    assert "schedules:" not in out and out.count("  linear_decay ") == 1


def test_report_without_results_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no results yet" in capsys.readouterr().err


@pytest.mark.slow
def test_real_mnist_lenet300_keeps_accuracy_at_90_percent(tmp_path):
    """A short version of the demo on real MNIST: 2 dense epochs, prune to 90%, 1 epoch."""
    config = load_config(None, {
        "name": "mnist-short", "data.dataset": "mnist", "model.name": "lenet300_100",
        "train.epochs": 2, "train.optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        "train.lr_schedule": {"name": "cosine"}, "prune.sparsities": [0.9],
        "finetune.epochs": 1, "finetune.optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
    })
    results = run_sweep(config, RunDir.for_config(config, tmp_path), progress=False, echo=lambda s: None)
    rows = {r["phase"]: r for r in results["levels"]}
    assert rows["dense"]["test_acc"] >= 0.975
    assert rows["sparsity-0.9"]["sparsity"] == pytest.approx(0.9, abs=1e-9)
    assert rows["sparsity-0.9"]["test_acc"] >= 0.97


def test_a_run_directory_is_used_by_one_process_at_a_time(tmp_path):
    import subprocess
    import sys

    config = load_config(write_config(tmp_path))
    run = RunDir.for_config(config, tmp_path / "runs")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from secateurs.experiments import RunDir\n"
         "with RunDir(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(30)", str(run.path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by another secateurs process \\(pid {holder.pid}\\)"):
            run_sweep(config, run, progress=False, echo=lambda s: None)
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops the lock of a killed process: the run proceeds
    assert run_sweep(config, run, progress=False, echo=lambda s: None)["complete"]


def test_a_run_written_before_an_option_existed_still_resumes(tmp_path):
    config = load_config(write_config(tmp_path))
    run = RunDir.for_config(config, tmp_path / "runs")
    run.bind(config)
    saved = yaml.safe_load(run.config_path.read_text())
    del saved["prune"]["reset"]  # as written by a version without prune.reset
    run.config_path.write_text(yaml.safe_dump(saved))
    run.bind(config)  # no "different config" error
    changed = load_config(write_config(tmp_path), {"prune.reset": "rewind"})
    with pytest.raises(ConfigError, match="prune.reset"):
        run.bind(changed)
