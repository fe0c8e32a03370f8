import subprocess
import sys

import pytest

from secateurs.errors import ConfigError
from secateurs.seeding import derive_seed


def test_stable_across_processes():
    # hash() of a str is salted per process; the derived seed must not be
    code = "from secateurs.seeding import derive_seed; print(derive_seed(3, 'sweep', 'sparsity-0.9'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert outs == {f"{derive_seed(3, 'sweep', 'sparsity-0.9')}\n"}


def test_distinct_purposes_and_seeds():
    seeds = {derive_seed(s, "sweep", p) for s in range(50) for p in ("dense", "sparsity-0.5", "sparsity-0.9")}
    assert len(seeds) == 150
    assert derive_seed(0, "a", "bc") != derive_seed(0, "ab", "c")
    assert derive_seed(0, 1) != derive_seed(0, "1")
    assert all(0 <= s < 2 ** 63 for s in seeds)  # fits torch.manual_seed and numpy


@pytest.mark.parametrize("bad", [1.5, True, "3"])
def test_bad_seed(bad):
    with pytest.raises(ConfigError, match="seed must be an integer"):
        derive_seed(bad, "x")


def test_needs_purpose():
    with pytest.raises(ConfigError, match="purpose"):
        derive_seed(0)


def test_sweep_phases_train_on_derived_seeds(tmp_path, monkeypatch):
    """Each phase of a sweep (dense, every level) trains and orders its batches by
    derive_seed(seed, "sweep", phase), not by seed * 1000 + index."""
    import secateurs.experiments.sweep as sweep
    from secateurs.experiments import RunDir, load_config

    seen = {}
    original = sweep.Trainer

    def spy(model, train_data, cfg, *args, checkpoint_path=None, **kwargs):
        seen[checkpoint_path.stem] = (cfg.seed, train_data._generator.initial_seed())
        return original(model, train_data, cfg, *args, checkpoint_path=checkpoint_path, **kwargs)

    monkeypatch.setattr(sweep, "Trainer", spy)
    config = load_config(None, {"name": "seeds", "seed": 1, "data": {"dataset": "digits", "batch_size": 256},
                                "train": {"epochs": 1}, "finetune": {"epochs": 1},
                                "prune": {"sparsities": [0.5, 0.8], "reset": "reinit"}})
    sweep.run_sweep(config, RunDir.for_config(config, tmp_path), progress=False, echo=lambda s: None)
    assert seen == {p: (derive_seed(1, "sweep", p),) * 2 for p in ("dense", "sparsity-0.5", "sparsity-0.8")}
    assert len({s for s, _ in seen.values()}) == 3
