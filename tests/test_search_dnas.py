"""DNAS with tiered pruning (secateurs.search.dnas, PruNet: Kierat et al. 2022) and its unit
(secateurs.experiments.dnas): Prunode, block and layer pruning, the latency term, resume."""
from __future__ import annotations

import ast
import dataclasses
import io
import math
from pathlib import Path

import pytest
import torch

from secateurs.errors import CheckpointError, ConfigError
from secateurs.search.dnas import SKIP, DNAS, DNASSettings, Prunode, SuperBlock, Supernet, macs_latency
from secateurs.search.space import Architecture, Block, InputShape, build, layer_shapes

SHAPE = InputShape(1, 8, 3)


def tiny(**kw) -> DNASSettings:
    base = dict(stages=(2,), ops=("conv3", "dwsep3"), widths=(4, 8), width_step=2, fc_layers=1, fc_widths=(8, 16),
                fc_width_step=None, epochs=2, warmup_epochs=0, prune_warmup_epochs=0)
    return DNASSettings(**{**base, **kw})


def data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, :, :4].mean((1, 2, 3)) > 0).long() + (x[:, :, :, :4].mean((1, 2, 3)) > 0).long()
    return x, y


def batches(x, y, size=16):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def search_epochs(d: DNAS, epochs: int, seed: int = 0) -> None:
    x, y = data(seed=seed)
    for _ in range(epochs):
        d.train_epoch(batches(x[:64], y[:64]), batches(x[64:], y[64:]))


def parameters_by_hand(arch: Architecture, shape: InputShape) -> int:
    """Weights + biases of build(arch, shape) with batch norm, from the shapes alone."""
    total, channels, side = 0, shape.channels, shape.size
    for b in arch.conv_blocks:
        k = int(b.op[-1])
        if b.op.startswith("dwsep"):
            total += channels * k * k + channels * b.width  # depthwise, pointwise (no bias under batch norm)
        else:
            total += channels * b.width * k * k
        total += 2 * b.width  # batch norm scale and shift
        channels, side = b.width, side // 2 if b.pool else side
    features = channels * side * side
    for b in arch.fc_blocks:
        total += features * b.width + b.width
        features = b.width
    return total + features * shape.classes + shape.classes


# -- Prunode ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,pool", [("conv3", True), ("dwsep5", False), ("conv1", False), ("fc", False)])
def test_prunode_path_with_weight_one_is_the_plain_block(op, pool):
    torch.manual_seed(0)
    channels = 3  # fewer than the SuperBlock's in_max: the input channels are sliced too
    block = SuperBlock(op, 5, 16, pool=pool)
    prunode = Prunode((4, 8, 12, 16))
    with torch.no_grad():
        prunode.index.fill_(1)  # masks 8 and 12
    x = torch.randn(4, channels, 6, 6) if op != "fc" else torch.randn(4, channels)
    for weights, width in (([0.0, 1.0], prunode.big), ([1.0, 0.0], prunode.small)):
        out = block(x, prunode.big) * prunode.mask(torch.tensor(weights)).view((1, -1) + (1,) * (x.dim() - 2))
        plain_arch = Architecture((Block(op, width, pool),))
        if op == "fc":
            plain = build(plain_arch, InputShape(channels, 1, 2)).blocks[1]
            with torch.no_grad():
                plain[0].weight.copy_(block.linear.weight[:width, :channels])
                plain[0].bias.copy_(block.linear.bias[:width])
        else:
            plain = build(plain_arch, InputShape(channels, 6, 2)).blocks[0]
            with torch.no_grad():
                if op.startswith("dwsep"):
                    plain[0].weight.copy_(block.depthwise.weight[:channels])
                    plain[1].weight.copy_(block.conv.weight[:width, :channels])
                else:
                    plain[0].weight.copy_(block.conv.weight[:width, :channels])
                bn = [m for m in plain if isinstance(m, torch.nn.BatchNorm2d)][0]
                bn.weight.copy_(block.bn.weight[:width])
                bn.bias.copy_(block.bn.bias[:width])
        expected = plain(x)
        assert out.shape[1] == prunode.big
        torch.testing.assert_close(out[:, :width], expected, rtol=0, atol=1e-6)
        assert torch.all(out[:, width:] == 0)


def test_prunode_moves_towards_the_winning_mask_and_restarts_even():
    p = Prunode((4, 6, 8))
    assert (p.small, p.big) == (6, 8)  # starts at the widest
    with torch.no_grad():
        p.alpha.copy_(torch.tensor([1.0, 0.0]))  # p_small = 0.73
    assert p.move(0.6) == "shrink" and (p.small, p.big) == (4, 6)
    assert torch.equal(p.alpha.detach(), torch.zeros(2))
    assert p.move(0.6) is None  # even: stays
    with torch.no_grad():
        p.alpha.copy_(torch.tensor([1.0, 0.0]))
    assert p.move(0.6) is None and (p.small, p.big) == (4, 6)  # at the bottom already
    with torch.no_grad():
        p.alpha.copy_(torch.tensor([0.0, 1.0]))
    assert p.move(0.6) == "grow" and (p.small, p.big) == (6, 8)
    assert p.chosen() == 8


# -- pruning ----------------------------------------------------------------------------------------
def set_probabilities(layer, probs: dict) -> None:
    with torch.no_grad():
        layer.alpha.copy_(torch.tensor([math.log(probs[c]) for c in layer.choices]))


def test_block_pruning_removes_what_falls_below_the_threshold_never_the_last_block():
    s = tiny(stages=(2,), ops=("conv3", "conv5", "dwsep3", "dwsep5"), block_threshold=0.1)
    d = DNAS(s, SHAPE, macs_latency)
    first, second = d.supernet.layers[0], d.supernet.layers[1]
    assert first.choices == ("conv3", "conv5", "dwsep3", "dwsep5")  # a pooling layer has no skip
    assert second.choices[-1] == SKIP
    set_probabilities(first, {"conv3": 0.5, "conv5": 0.04, "dwsep3": 0.4, "dwsep5": 0.06})
    # only the skip is likely: every op is below the threshold, but the most probable op stays
    set_probabilities(second, {"conv3": 0.02, "conv5": 0.03, "dwsep3": 0.02, "dwsep5": 0.01, SKIP: 0.92})
    removed = d.prune_blocks()
    assert {(r["layer"], r["choice"]) for r in removed} == {(0, "conv5"), (0, "dwsep5"), (1, "conv3"), (1, "dwsep3"),
                                                            (1, "dwsep5")}
    assert [c for c, a in zip(first.choices, first.active.tolist()) if a] == ["conv3", "dwsep3"]
    assert [c for c, a in zip(second.choices, second.active.tolist()) if a] == ["conv5", SKIP]
    # pruned choices get no probability, no sample weight and no latency
    assert float(first.probabilities()[1].detach()) == 0 and float(first.probabilities().detach().sum()) == pytest.approx(1)
    layer_w, _ = d.sample_weights(1.0)
    assert float(layer_w[0][1].detach()) == 0 and float(layer_w[0][3].detach()) == 0
    # again with a threshold nothing passes: still one block per layer
    d.settings.__dict__["block_threshold"] = 0.99
    d.prune_blocks()
    assert sum(first.active.tolist()) == 1 and first.choices[first.active.tolist().index(True)] == "conv3"
    assert [c for c, a in zip(second.choices, second.active.tolist()) if a] == ["conv5", SKIP]
    x, y = data(16)
    d.step(x, y, x, y)  # still searches


def test_layer_pruning_leaves_a_network_that_runs_with_the_predicted_parameters():
    s = tiny(stages=(3, 2), ops=("conv3", "dwsep5"), fc_layers=2, layer_threshold=0.5)
    d = DNAS(s, SHAPE, macs_latency)
    layers = d.supernet.layers
    assert [layer.skippable for layer in layers] == [False, True, True, False, True, False, True]
    set_probabilities(layers[1], {"conv3": 0.2, "dwsep5": 0.2, SKIP: 0.6})  # removed
    set_probabilities(layers[2], {"conv3": 0.6, "dwsep5": 0.1, SKIP: 0.3})  # stays (conv3)
    set_probabilities(layers[4], {"conv3": 0.1, "dwsep5": 0.4, SKIP: 0.5})  # removed (reaches the threshold)
    set_probabilities(layers[6], {"fc": 0.7, SKIP: 0.3})
    set_probabilities(layers[0], {"conv3": 0.3, "dwsep5": 0.7})
    with torch.no_grad():
        d.supernet.prunodes[1].alpha.copy_(torch.tensor([2.0, 0.0]))  # stage 2 at its small width
    removed = d.prune_layers()
    assert [r["layer"] for r in removed] == [1, 4]
    assert not bool(layers[1].alive) and not bool(layers[4].alive)
    arch = d.derive()
    p0, p1, pf = (p for p in d.supernet.prunodes)
    assert arch == Architecture((Block("dwsep5", p0.big, True), Block("conv3", p0.big), Block(layers[3].choices[0], p1.small, True),
                                 Block("fc", pf.big), Block("fc", pf.big)))
    model = build(arch, SHAPE)
    assert sum(p.numel() for p in model.parameters()) == parameters_by_hand(arch, SHAPE)
    x, y = data(16)
    assert model(x).shape == (16, SHAPE.classes)
    # the pruned supernet still runs (forward and a search step) and skips the removed layers
    layer_w, mask_w = d.sample_weights(1.0)
    assert d.supernet(x, layer_w, mask_w).shape == (16, SHAPE.classes)
    before = layers[1].blocks["conv3"].conv.weight.detach().clone()
    d.step(x, y, x, y)
    assert torch.equal(before, layers[1].blocks["conv3"].conv.weight.detach())  # never computed again
    assert d.prune_layers() == []


# -- latency ----------------------------------------------------------------------------------------
def test_expected_latency_is_differentiable_and_matches_the_derived_network_when_certain():
    s = tiny(stages=(1, 2), ops=("conv3", "conv5", "dwsep3"), widths=(4, 8, 16), width_step=2)
    d = DNAS(s, SHAPE, macs_latency)
    lat = d.expected_latency()
    grads = torch.autograd.grad(lat, d.supernet.architecture_parameters(), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # gradient descent on the latency alone moves probability to the cheaper choices
    opt = torch.optim.SGD(d.supernet.architecture_parameters(), lr=1e6)
    for _ in range(20):
        opt.zero_grad()
        d.expected_latency().backward()
        opt.step()
    assert float(d.expected_latency().detach()) < float(lat.detach())
    probs = d.supernet.layers[1].probabilities()
    assert int(probs.argmax()) == d.supernet.layers[1].choices.index("dwsep3")
    # with certain choices (and Prunode widths off the measured grid: 6, 10, ... interpolated), the
    # expected latency is the derived network's; MACs are bilinear in the widths, so it is exact
    with torch.no_grad():
        for layer, pick in zip(d.supernet.layers, ("conv5", SKIP, "conv3", SKIP)):
            if pick not in layer.choices:
                pick = "conv3"
            layer.alpha.copy_(torch.tensor([40.0 if c == pick else -40.0 for c in layer.choices]))
        d.supernet.prunodes[0].index.fill_(3)  # 10 / 12
        d.supernet.prunodes[1].index.fill_(1)  # 6 / 8
        for p in d.supernet.prunodes:
            p.alpha.copy_(torch.tensor([40.0, -40.0]))
    arch = d.derive()
    assert [b.width for b in arch.blocks][:2] == [10, 6]
    exact = sum(macs_latency(Block(row["op"], row["out"][0], row["pool"]), row["in"])
                for row in layer_shapes(arch, SHAPE)[:-1])
    assert d.predicted_latency() == pytest.approx(exact, rel=1e-9)
    assert float(d.expected_latency().detach()) == pytest.approx(exact, rel=1e-6)


def test_latency_weight_derives_a_cheaper_network():
    derived = {}
    for weight in (0.0, 50.0):
        s = tiny(stages=(1, 2), ops=("conv3", "conv5", "dwsep3"), epochs=3, latency_weight=weight, arch_lr=0.1,
                 block_threshold=0.0, layer_threshold=1.0)
        d = DNAS(s, SHAPE, macs_latency, seed=3)
        search_epochs(d, 3)
        derived[weight] = (d.derive(), d.predicted_latency(), float(d.expected_latency().detach()))
    assert derived[50.0][1] < derived[0.0][1], derived
    assert derived[50.0][2] < derived[0.0][2], derived


# -- resume -----------------------------------------------------------------------------------------
def test_resumed_search_is_bit_identical():
    s = tiny(epochs=3, warmup_epochs=1, prune_warmup_epochs=1, block_threshold=0.45, arch_lr=0.2)
    straight = DNAS(s, SHAPE, macs_latency, seed=7)
    search_epochs(straight, 3)

    first = DNAS(s, SHAPE, macs_latency, seed=7)
    search_epochs(first, 1)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = DNAS(s, SHAPE, macs_latency, seed=7)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    search_epochs(resumed, 2)

    assert resumed.derive() == straight.derive()
    assert resumed.history == straight.history
    for a, b in zip(resumed.supernet.architecture_parameters(), straight.supernet.architecture_parameters()):
        assert torch.equal(a, b)
    for (ka, a), (kb, b) in zip(resumed.supernet.state_dict().items(), straight.supernet.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    assert any(r["pruned_blocks"] for r in straight.history)  # pruning happened in between
    with pytest.raises(ConfigError, match="epochs"):
        straight.train_epoch(batches(*data(16)))


def test_state_of_another_search_is_refused():
    state = DNAS(tiny(), SHAPE, macs_latency, seed=1).state_dict()
    with pytest.raises(CheckpointError, match="seed"):
        DNAS(tiny(), SHAPE, macs_latency, seed=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="settings"):
        DNAS(tiny(widths=(4, 12)), SHAPE, macs_latency, seed=1).load_state_dict(state)
    with pytest.raises(CheckpointError, match="not a DNAS"):
        DNAS(tiny(), SHAPE, macs_latency, seed=1).load_state_dict({"model": {}})


# -- the unit ---------------------------------------------------------------------------------------
def toy_dataset():
    from secateurs.data import ImageDataset

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (120, 1, 8, 8), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    label = lambda im: (im[:, :, :4].float().mean((1, 2, 3)) > 127.5).long() + (im[:, :, :, :4].float().mean((1, 2, 3)) > 127.5).long()  # noqa: E731
    return ImageDataset("toy", train, label(train), test, label(test), 3, (0.5,), (0.25,))


def unit_config(**kw):
    from secateurs.experiments.config import DataConfig
    from secateurs.experiments.dnas import DNASUnitConfig

    return DNASUnitConfig(name="dnas-test", device="cpu", data=DataConfig(dataset="toy", batch_size=16),
                          search=tiny(epochs=3, warmup_epochs=1, prune_warmup_epochs=1, block_threshold=0.3),
                          latency="macs", **kw)


def test_unit_interrupted_after_an_epoch_resumes_to_the_same_results(tmp_path: Path):
    from secateurs.experiments.dnas import run_dnas_unit
    from secateurs.experiments.runs import RunDir

    config, dataset = unit_config(), toy_dataset()
    quiet = dict(progress=False, echo=lambda m: None, dataset=dataset)
    straight = run_dnas_unit(config, RunDir(tmp_path / "straight"), **quiet)

    class Interrupt(Exception):
        pass

    def stop(record):
        if record["epoch"] == 1:
            raise Interrupt

    run = RunDir(tmp_path / "interrupted")
    with pytest.raises(Interrupt):
        run_dnas_unit(config, run, callback=stop, **quiet)
    assert not run.results_path.is_file() and run.checkpoint("search").is_file()
    messages = []
    resumed = run_dnas_unit(config, run, progress=False, echo=messages.append, dataset=dataset)
    assert any("resumed the DNAS search at epoch 1/3" in m for m in messages)
    assert resumed["complete"] and resumed["architecture"] == straight["architecture"]
    assert resumed["history"] == straight["history"]
    assert resumed["expected_latency"] == straight["expected_latency"]
    assert resumed["supernet_test_acc"] == straight["supernet_test_acc"]
    assert isinstance(resumed["search_seconds"], float) and len(resumed["epoch_seconds"]) == 3
    arch = Architecture.from_dict(resumed["architecture"])
    assert build(arch, SHAPE)(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    assert run_dnas_unit(config, run, **quiet)["architecture"] == straight["architecture"]  # reused


def test_unit_hash_ignores_where_the_latency_table_is_cached():
    from secateurs.experiments.dnas import DNASUnitConfig

    a = DNASUnitConfig(latency_table="/tmp/a/latency.json")
    b = DNASUnitConfig(latency_table="/elsewhere/table.json")
    assert a.run_name() == b.run_name() == DNASUnitConfig().run_name()
    assert "latency_table" not in a.to_dict()
    assert DNASUnitConfig(latency="macs").run_name() != a.run_name()
    assert DNASUnitConfig(search=DNASSettings(epochs=3)).run_name() != a.run_name()


# -- bad inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,named", [
    ({"stages": (0,)}, "stages"),
    ({"stages": (), "fc_layers": 0}, "stages"),
    ({"ops": ("conv7",)}, "ops"),
    ({"ops": ()}, "ops"),
    ({"ops": ("conv3", "conv3")}, "ops"),
    ({"widths": (8,), "width_step": None}, "widths"),
    ({"widths": (8, 8)}, "widths"),
    ({"width_step": 0}, "width_step"),
    ({"fc_widths": (0, 8)}, "fc_widths"),
    ({"fc_layers": -1}, "fc_layers"),
    ({"epochs": 0}, "epochs"),
    ({"warmup_epochs": 8}, "warmup_epochs"),
    ({"warmup_epochs": 2, "prune_warmup_epochs": 1}, "prune_warmup_epochs"),
    ({"temperature_start": 0.0}, "temperature_start"),
    ({"temperature_end": float("inf")}, "temperature_end"),
    ({"weight_lr": -0.1}, "weight_lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"arch_lr": 0}, "arch_lr"),
    ({"latency_weight": -1.0}, "latency_weight"),
    ({"latency_target": 0.0}, "latency_target"),
    ({"prunode_threshold": 0.5}, "prunode_threshold"),
    ({"block_threshold": 1.0}, "block_threshold"),
    ({"layer_threshold": 0.0}, "layer_threshold"),
    ({"skip": "yes"}, "skip"),
    ({"epochs": 2.0}, "epochs"),
])
def test_bad_settings_name_the_setting(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        DNASSettings(**kwargs)


def test_bad_search_inputs():
    with pytest.raises(ConfigError, match="stages"):
        DNAS(tiny(stages=(1, 1, 1, 1)), SHAPE, macs_latency)  # 8px pooled 4 times
    with pytest.raises(ConfigError, match="latency"):
        DNAS(tiny(), SHAPE, "table")
    with pytest.raises(ConfigError, match="finite seconds"):
        DNAS(tiny(), SHAPE, lambda block, shape: float("nan"))
    with pytest.raises(ConfigError, match="InputShape"):
        DNAS(tiny(), (1, 8, 8), macs_latency)
    with pytest.raises(ConfigError, match="DNASSettings"):
        DNAS({"epochs": 1}, SHAPE, macs_latency)


@pytest.mark.parametrize("kwargs,named", [
    ({"arch_fraction": 1.0}, "arch_fraction"),
    ({"latency": "fast"}, "latency"),
    ({"latency": "macs", "latency_table": "x.json"}, "latency_table"),
    ({"subset": 1}, "subset"),
    ({"device": "tpu9"}, "device"),
])
def test_bad_unit_config(kwargs, named):
    from secateurs.experiments.dnas import DNASUnitConfig

    with pytest.raises(ConfigError, match=named):
        DNASUnitConfig(**kwargs)


def test_unit_config_from_yaml_dict_names_the_section():
    from secateurs.experiments.dnas import DNASUnitConfig
    from secateurs.typed_config import from_dict

    config = from_dict(DNASUnitConfig, {"search": {"stages": [1, 1], "widths": [8, 16]}, "latency": "macs"})
    assert config.search.stages == (1, 1) and isinstance(config.search, DNASSettings)
    with pytest.raises(ConfigError, match="search.*warmup_epochs"):
        from_dict(DNASUnitConfig, {"search": {"epochs": 2, "warmup_epochs": 2}})


def test_library_module_imports_no_experiment_layer():
    source = Path(__file__).parents[1] / "src" / "secateurs" / "search" / "dnas.py"
    tree = ast.parse(source.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    forbidden = ("data", "models", "train", "experiments", "cli")
    bad = [n for n in names if any(n.lstrip(".").split(".")[0] == f or n.startswith(f"secateurs.{f}") for f in forbidden)
           or n in ("..data", "..models", "..train", "..experiments", "..cli")]
    assert not bad, bad
    assert dataclasses.is_dataclass(DNASSettings) and issubclass(Supernet, torch.nn.Module)
