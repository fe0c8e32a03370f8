"""OWL (outlier-weighed layerwise sparsity, Yin et al. 2024) for one-shot pruning: the
allocation formula by hand, the outlier ratios against an independent computation on the
dense model, exact per-block counts, resume, and bad input."""
import pytest
import torch

from secateurs.allocation import keep_count
from secateurs.errors import CheckpointError, ConfigError
from secateurs.methods.oneshot import (
    calibration_samples, owl_block_sparsity, prune_oneshot, wanda_scores,
)

transformers = pytest.importorskip("transformers")


def _llama(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # outliers that differ between blocks, as trained LLMs have
        model.model.layers[1].mlp.down_proj.weight[:, :3] *= 40
    return model


def _samples():
    tokens = torch.randint(0, 96, (4000,), generator=torch.Generator().manual_seed(1))
    return calibration_samples(tokens, 8, 32)


def test_the_allocation_formula_by_hand():
    # densities (D - min) / (max - min) * 2 lambda = [0, 0.16, 0.08], mean 0.08, shifted to mean 0.5
    assert owl_block_sparsity([0.01, 0.03, 0.02], [10, 10, 10], 0.5, 0.08) == pytest.approx([0.58, 0.42, 0.5])
    assert owl_block_sparsity([0.2, 0.2], [5, 7], 0.7, 0.1) == pytest.approx([0.7, 0.7])  # no spread: uniform


def test_unequal_blocks_keep_the_overall_sparsity():
    sizes = [100, 300, 50]
    out = owl_block_sparsity([0.05, 0.01, 0.09], sizes, 0.6, 0.1)
    assert sum(s * n for s, n in zip(out, sizes)) / sum(sizes) == pytest.approx(0.6)
    assert out[2] < out[0] < out[1]  # more outliers, fewer pruned


def _dense_outlier_ratios(model, samples, m=5.0):
    """Independently: every layer's input norms on the dense model through hooks, Wanda scores,
    the share above m x the block's mean."""
    sq = {}
    linears = {n: mod for n, mod in model.model.layers.named_modules() if isinstance(mod, torch.nn.Linear)}

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
        return fn

    handles = [mod.register_forward_hook(hook(n)) for n, mod in linears.items()]
    with torch.no_grad():
        for s in samples:
            model(**s) if isinstance(s, dict) else model(s)
    for h in handles:
        h.remove()
    ratios = []
    for b in range(len(model.model.layers)):
        flat = torch.cat([wanda_scores(mod.weight, sq[n].sqrt()).flatten() for n, mod in linears.items()
                          if n.split(".")[0] == str(b)]).double()
        ratios.append(float((flat > m * flat.mean()).double().mean()))
    sizes = [sum(mod.weight.numel() for n, mod in linears.items() if n.split(".")[0] == str(b)) for b in range(3)]
    return ratios, sizes


def test_owl_prunes_each_block_to_its_outlier_weighed_target():
    samples = _samples()
    ratios, sizes = _dense_outlier_ratios(_llama(), samples)
    expected = owl_block_sparsity(ratios, sizes, 0.6, 0.08)
    assert max(expected) - min(expected) > 0.05  # the blocks really differ
    model = _llama()
    result = prune_oneshot(model, samples, "wanda", 0.6, allocation="owl")
    assert result.block_sparsity == pytest.approx(expected, abs=1e-12)
    for name, mask in result.masks.items():
        b = int(name.split(".")[2])
        fan = mask.shape[1]
        assert mask.sum(1).tolist() == [keep_count(fan, expected[b])] * mask.shape[0], name  # Wanda: per row
    assert result.sparsity == pytest.approx(0.6, abs=0.01)
    # the block with the most outliers keeps the most weights (here block 2: block 1's scaled
    # weights make outlier features in the residual stream it feeds)
    assert min(range(3), key=lambda b: expected[b]) == max(range(3), key=lambda b: ratios[b]) == 2


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_owl_works_with_other_methods(method):
    result = prune_oneshot(_llama(), _samples(), method, 0.6, allocation="owl")
    for name, mask in result.masks.items():
        b = int(name.split(".")[2])
        group = mask.numel() if method == "sparsegpt" else mask.shape[1]
        rows = 1 if method == "sparsegpt" else mask.shape[0]
        assert int(mask.sum()) == rows * keep_count(group, result.block_sparsity[b]), name


def test_an_interrupted_owl_run_resumes_with_its_plan(tmp_path):
    samples = _samples()
    reference = prune_oneshot(_llama(), samples, "wanda", 0.6, allocation="owl")
    state = tmp_path / "state.pt"

    def stop_after_first(b):
        if b == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune_oneshot(_llama(), samples, "wanda", 0.6, allocation="owl", state_path=str(state), on_block=stop_after_first)
    # the resumed run takes the plan from the state (recomputed on a half-pruned model it would differ)
    resumed = prune_oneshot(_llama(), samples, "wanda", 0.6, allocation="owl", state_path=str(state))
    assert resumed.block_sparsity == reference.block_sparsity
    assert all(torch.equal(resumed.masks[k], reference.masks[k]) for k in reference.masks)
    with pytest.raises(CheckpointError, match="another one-shot run"):
        prune_oneshot(_llama(), samples, "wanda", 0.6, state_path=str(state))  # uniform on an OWL state
    with pytest.raises(CheckpointError, match="another one-shot run"):
        prune_oneshot(_llama(), samples, "wanda", 0.6, allocation="owl", owl_lambda=0.05, state_path=str(state))


@pytest.mark.parametrize("kwargs, message", [
    (dict(allocation="erk"), "unknown allocation 'erk'; known: uniform, owl"),
    (dict(allocation="owl", nm=(2, 4), sparsity=None), "nothing to allocate"),
    (dict(allocation="owl", owl_lambda=0.0), r"owl_lambda must be a number in \(0, 1\), got 0.0"),
    (dict(allocation="owl", owl_lambda=True), "owl_lambda must be a number"),
    (dict(allocation="owl", owl_m=-1.0), "owl_m must be a number > 0"),
    (dict(allocation="owl", sparsity=0.95, owl_lambda=0.2), r"outside \[0, 1\); lower owl_lambda"),
])
def test_bad_owl_settings(kwargs, message):
    args = dict(sparsity=0.6) | kwargs
    with pytest.raises(ConfigError, match=message):
        prune_oneshot(_llama(), _samples(), "wanda", args.pop("sparsity"), **args)
