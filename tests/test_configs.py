"""Every shipped config loads and validates (names, keys, schedules), without training."""
from pathlib import Path

import pytest
import yaml

from secateurs.data import DATASETS
from secateurs.experiments import load_config
from secateurs.experiments.compare import experiment_configs, load_comparison
from secateurs.experiments.growth import load_growth_config
from secateurs.experiments.grow_prune import load_grow_prune_config
from secateurs.experiments.indicators import load_indicators_config
from secateurs.experiments.linearize import load_linearize_config
from secateurs.experiments.lottery import load_lottery_config
from secateurs.experiments.plasticity import load_plasticity
from secateurs.experiments.search import load_search_config
from secateurs.experiments.structured import load_structured_config
from secateurs.methods import METHODS
from secateurs.models import MODELS

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


#: experiment kinds with their own config type, told apart by their own top-level section
OWN_SECTION = {"strategies": load_search_config, "growth": load_growth_config, "architectures": load_indicators_config,
               "grow_prune": load_grow_prune_config, "snl": load_linearize_config}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    data = yaml.safe_load(path.read_text())
    own = [loader for section, loader in OWN_SECTION.items() if section in data]
    if own:
        config = own[0](path)
        DATASETS.get(config.data.dataset)
        return
    if "lottery" in data or "structured" in data:
        config = (load_lottery_config if "lottery" in data else load_structured_config)(path)
        MODELS.get(config.model.name)
        DATASETS.get(config.data.dataset)
        return
    if "variants" in data:
        configs = [c for _, _, c in experiment_configs(load_comparison(path))]
    elif "prune_epochs" in data:
        configs = [load_plasticity(path).experiment()]
    else:
        configs = [load_config(path)]
    for config in configs:
        MODELS.get(config.model.name)
        DATASETS.get(config.data.dataset)
        factory = METHODS.get(config.prune.method)
        if config.prune.params:
            from secateurs.experiments.sweep import _accepted_params

            assert set(config.prune.params) <= set(_accepted_params(factory)), config.prune.params


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"demo_lenet300_mnist.yaml", "dst_lenet5_fashion.yaml", "granet_cifar10_vgg19.yaml"} <= names
