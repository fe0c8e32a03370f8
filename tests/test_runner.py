"""The runner of units and its executors: the same table whichever executor ran the units,
no unit trained twice by two drivers, a killed worker's unit retried and resumed, a failing
unit reported by its key while the others go on, and bad executors refused up front."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from secateurs.errors import ConfigError
from secateurs.experiments.compare import comparison_units, load_comparison, run_comparison
from secateurs.experiments.runner import Unit, check_shared_storage, make_executor, run_units
from secateurs.experiments.runs import RunDir
from secateurs.experiments.sweep import run_sweep
from secateurs.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

COMPARISON = {
    "name": "ex",
    "seeds": [0, 1],
    "base": {
        "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
        "model": {"name": "lenet300_100"},
        "train": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
        "prune": {"sparsities": [0.9]},
    },
    "variants": [
        {"label": "GMP", "method": "gmp", "params": {"every": 10}},
        {"label": "magnitude", "method": "magnitude", "set": {"finetune.epochs": 1}},
    ],
}


def _comparison(tmp_path, **changes):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump({**COMPARISON, **changes}))
    return path, load_comparison(path)


def _weights(runs: Path, comparison) -> dict:
    """Every run's final checkpoint, by unit key."""
    out = {}
    for unit in comparison_units(comparison):
        run = RunDir.for_config(unit.config, runs)
        last = sorted(run.checkpoints.glob("*.pt"))[-1]
        out[unit.key] = load_checkpoint(last)["model"]
    return out


def _table(summary: dict) -> list:
    return json.loads((Path(summary["dir"]) / "comparison.json").read_text())["rows"]


def test_processes_executor_gives_the_local_table_bit_for_bit(tmp_path):
    _, comparison = _comparison(tmp_path)
    # the same torch threads per unit everywhere: floats may differ between thread counts
    quiet = dict(progress=False, echo=lambda s: None, threads=1)
    local = run_comparison(comparison, tmp_path / "local", executor="local", **quiet)
    pooled = run_comparison(comparison, tmp_path / "pool", executor="processes:2", **quiet)
    assert local["complete"] and pooled["complete"] and not pooled["failed"]
    assert _table(local) == _table(pooled)  # floats compared exactly
    a, b = _weights(tmp_path / "local", comparison), _weights(tmp_path / "pool", comparison)
    assert a.keys() == b.keys() and len(a) == 6
    for key in a:
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def _count_trainings(runs: Path, comparison) -> dict:
    """How many times each (unit, phase, epoch) was logged: a unit trained twice logs twice."""
    counts = {}
    for unit in comparison_units(comparison):
        lines = RunDir.for_config(unit.config, runs).metrics_path.read_text().splitlines()
        for line in lines:
            rec = json.loads(line)
            key = (unit.key, rec["phase"], rec["epoch"])
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_two_drivers_on_one_comparison_never_train_a_unit_twice(tmp_path):
    path, comparison = _comparison(tmp_path)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "secateurs", "compare", "--config", str(path), "--runs-dir", str(runs), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    drivers = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outs = [d.communicate(timeout=600)[0] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outs
    counts = _count_trainings(runs, comparison)
    assert counts and set(counts.values()) == {1}, {k: v for k, v in counts.items() if v > 1}
    # both drivers print the same complete table
    tables = [out[out.index("| sparsity |"):out.index("wrote ")] for out in outs]
    assert tables[0] == tables[1] and "INCOMPLETE" not in "".join(outs)
    # every unit ran once, in one driver or the other (held ones were waited for, then reused)
    finished = [line for out in outs for line in out.splitlines() if ": finished in " in line]
    assert len(finished) == len(comparison_units(comparison))


def failing_unit(config, run, *, progress, echo, wait, dataset=None, **kwargs):
    raise RuntimeError("this unit is broken on purpose")


def test_a_failing_unit_is_reported_by_key_and_the_others_go_on(tmp_path):
    _, comparison = _comparison(tmp_path, seeds=[0])
    units = comparison_units(comparison)
    units[1] = Unit(units[1].key, units[1].config, failing_unit, units[1].kwargs)
    outcomes = run_units(units, tmp_path / "runs", progress=False, echo=lambda s: None)
    assert [o.status for o in outcomes] == ["finished", "failed", "finished"]
    assert outcomes[1].key == "GMP seed 0" and "RuntimeError: this unit is broken on purpose" in outcomes[1].error
    assert outcomes[2].results["complete"]


def test_the_cli_reports_failed_units_and_exits_1(tmp_path, capsys, monkeypatch):
    import secateurs.experiments.compare as compare
    from secateurs.cli import main

    path, _ = _comparison(tmp_path, seeds=[0])
    original = compare.comparison_units

    def breaking(comparison, seeds=None):
        units = original(comparison, seeds)
        return [units[0], Unit(units[1].key, units[1].config, failing_unit, units[1].kwargs), units[2]]

    monkeypatch.setattr(compare, "comparison_units", breaking)
    assert main(["compare", "--config", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAILED GMP seed 0: RuntimeError: this unit is broken on purpose" in out
    assert "| 90% | magnitude |" in out  # the units that finished are in the table


@pytest.mark.parametrize("spec, message", [
    ("threads", "unknown --executor 'threads'; known: local, processes:N, ray, ray:ADDRESS"),
    ("processes", "give the number of processes, e.g. processes:2"),
    ("processes:0", "give the number of processes"),
    ("ray:nohost", "give the head node as HOST:PORT"),
])
def test_bad_executor_names(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ex = make_executor(spec)
        ex.start("unused")


@pytest.mark.parametrize("threads", [0, -2, True])
def test_bad_thread_counts(threads):
    with pytest.raises(ConfigError, match="give a positive number of torch threads per unit"):
        make_executor("local", threads=threads)


def test_the_cli_refuses_an_unknown_executor_before_anything_runs(tmp_path, capsys):
    from secateurs.cli import main

    path, _ = _comparison(tmp_path)
    assert main(["compare", "--config", str(path), "--runs-dir", str(tmp_path / "runs"), "--executor", "gpu"]) == 2
    assert "unknown --executor 'gpu'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_ray_address_that_does_not_answer_fails_in_seconds_with_nothing_started(tmp_path):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, comparison = _comparison(tmp_path)
    with pytest.raises(ConfigError, match=rf"nothing answers at 127.0.0.1:{port} .*ray start --head"):
        run_comparison(comparison, tmp_path / "runs", executor=f"ray:127.0.0.1:{port}", progress=False, echo=lambda s: None)
    assert not any((tmp_path / "runs").glob("ex-*"))


def test_a_run_directory_some_node_cannot_see_is_refused(tmp_path):
    seen = {}

    def probe(token):
        seen["token"] = Path(token).read_text()
        return {"10.0.0.1 (head)": True, "10.0.0.2 (abcd1234)": False}

    with pytest.raises(ConfigError, match=r"not on storage shared by all Ray workers: node\(s\) 10.0.0.2 \(abcd1234\)"):
        check_shared_storage(str(tmp_path), probe)
    assert seen["token"] == "secateurs" and not list(tmp_path.iterdir())  # the token is cleaned up


def sweep_killed_once(config, run, *, progress, echo, wait, dataset=None, **kwargs):
    """Run the sweep; the first attempt at the GMP unit kills its own worker process right
    after the first epoch's checkpoint, as an OOM killer or a lost node would."""
    import secateurs.train.loop as loop

    marker = run.path.parent / ".killed-once"
    if config.prune.method == "gmp" and not marker.exists():
        save = loop.save_checkpoint

        def save_then_die(path, state):
            save(path, state)
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

        loop.save_checkpoint = save_then_die
    return run_sweep(config, run, progress=progress, echo=echo, wait=wait, dataset=dataset, **kwargs)


def _killed_once_then_compare(tmp_path, executor: str) -> list:
    """Run a comparison whose GMP unit's worker is killed after its first epoch, on
    ``executor``; every unit must finish, with the results and weights of an uninterrupted
    local run (the retried unit resumed from its epoch-1 checkpoint)."""
    _, comparison = _comparison(tmp_path, seeds=[0])
    quiet = dict(progress=False, echo=lambda s: None, threads=1)
    units = [Unit(u.key, u.config, sweep_killed_once, u.kwargs) for u in comparison_units(comparison)]
    outcomes = run_units(units, tmp_path / "cut", executor, **quiet)
    assert [o.status for o in outcomes] == ["finished"] * 3, [o.error for o in outcomes]
    assert (tmp_path / "cut" / ".killed-once").is_file()  # it did die once
    ref = run_units(comparison_units(comparison), tmp_path / "local", "local", **quiet)
    for o, r in zip(outcomes, ref):
        assert o.results["levels"] == r.results["levels"]
    a, b = _weights(tmp_path / "cut", comparison), _weights(tmp_path / "local", comparison)
    for key in a:
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    return outcomes


def test_processes_executor_retries_a_killed_worker_and_resumes(tmp_path):
    _killed_once_then_compare(tmp_path, "processes:2")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this test module's unit functions
    yield ray
    ray.shutdown()


def test_ray_executor_gives_the_local_table_bit_for_bit(tmp_path, ray_local):
    _, comparison = _comparison(tmp_path)
    quiet = dict(progress=False, echo=lambda s: None, threads=1)
    local = run_comparison(comparison, tmp_path / "local", executor="local", **quiet)
    rayed = run_comparison(comparison, tmp_path / "ray", executor="ray", **quiet)
    assert rayed["complete"] and not rayed["failed"]
    assert _table(local) == _table(rayed)
    a, b = _weights(tmp_path / "local", comparison), _weights(tmp_path / "ray", comparison)
    for key in a:
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_ray_retries_a_killed_worker_and_the_unit_resumes(tmp_path, ray_local):
    outcomes = _killed_once_then_compare(tmp_path, "ray")
    killed = int((tmp_path / "cut" / ".killed-once").read_text())
    assert next(o for o in outcomes if o.key == "GMP seed 0").pid != killed  # the retry ran in another worker


def test_a_unit_that_trains_on_cuda_is_refused_on_a_ray_cluster_without_gpus(tmp_path, ray_local):
    from dataclasses import replace

    _, comparison = _comparison(tmp_path, seeds=[0])
    units = comparison_units(comparison)
    units[2] = Unit(units[2].key, replace(units[2].config, device="cuda"), units[2].fn, units[2].kwargs)
    with pytest.raises(ConfigError, match="trains on cuda but the Ray cluster \\(ray\\) has no GPU"):
        run_units(units, tmp_path / "runs", "ray", progress=False, echo=lambda s: None)
    assert not any(RunDir.for_config(u.config, tmp_path / "runs").results_path.exists() for u in units)
