"""secateurs' Wanda / SparseGPT / RIA against their authors' formulations (benchmarks/
reference_oneshot.py re-states the reference code's algorithms: float32 running means,
truncating counts, per-block thresholds) on one tiny Llama and one calibration set."""
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from reference_oneshot import reference_prune  # noqa: E402

from secateurs.engine import select  # noqa: E402
from secateurs.granularity import check_nm  # noqa: E402
from secateurs.methods.oneshot import (  # noqa: E402
    ONESHOT_SCORES, METHODS_ONESHOT, calibration_samples, perplexity, prune_oneshot, ria_scores,
)


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tokens(n, seed):
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_wanda_masks_equal_the_reference_formulation(nm):
    """Same masks as the reference: its float32 running mean of squared norms ranks inputs like
    our float64 sums (a constant factor per layer), and 0.5 x an even fan-in truncates to the
    same count our rounding gives."""
    ours, theirs = _llama(), _llama()
    samples = calibration_samples(_tokens(4000, 1), 8, 32)
    result = prune_oneshot(ours, samples, "wanda", 0.5, nm=nm)
    expected = reference_prune(theirs, samples, "wanda", 0.5, nm=nm)
    assert set(result.masks) == set(expected) and len(expected) == 14
    for name, mask in expected.items():
        assert torch.equal(result.masks[name], mask), name
    for (n, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.allclose(a, b), n


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_the_reference_formulation_within_noise(nm):
    """The reference prunes by a per-block threshold (one weight more than the count per block)
    in float32; ours keeps exact counts in float64. Masks agree almost everywhere and held-out
    perplexity agrees within 1%."""
    ours, theirs, dense = _llama(), _llama(), _llama()
    samples = calibration_samples(_tokens(4000, 1), 8, 32)
    held_out = _tokens(2048, 7)
    result = prune_oneshot(ours, samples, "sparsegpt", 0.5, nm=nm)
    expected = reference_prune(theirs, samples, "sparsegpt", 0.5, nm=nm)
    agree = sum(int((result.masks[k] == v).sum()) for k, v in expected.items()) / sum(v.numel() for v in expected.values())
    assert agree > (0.999 if nm else 0.97)
    p_dense, p_ours, p_ref = (perplexity(m, held_out, 32) for m in (dense, ours, theirs))
    assert abs(p_ours - p_ref) / p_ref < 0.01, (p_dense, p_ours, p_ref)


def test_ria_is_relative_importance_times_root_input_norm_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.0, -1.0]])
    norms = torch.tensor([1.0, 4.0, 0.25])
    rel = w.abs() / w.abs().sum(1, keepdim=True) + w.abs() / w.abs().sum(0, keepdim=True)
    expected = rel * norms.sqrt()
    assert torch.allclose(ria_scores(w, norms).float(), expected)
    # the [in, out] layout of transformers' Conv1D gives the same scores, transposed
    assert torch.allclose(ria_scores(w.T, norms, output_axis=1).float(), expected.T)
    # an all-zero row or column scores 0, not NaN
    z = torch.zeros(2, 3)
    assert torch.equal(ria_scores(z, norms), torch.zeros(2, 3, dtype=torch.float64))


def test_ria_compares_within_the_tensor_and_is_registered():
    assert "ria" in METHODS_ONESHOT and ONESHOT_SCORES.get("ria").group == "tensor"
    model, reference = _llama(), _llama()
    samples = calibration_samples(_tokens(4000, 1), 4, 32)
    result = prune_oneshot(model, samples, "ria", 0.5)
    assert result.sparsity == 0.5
    # block 0's first layer by hand: its inputs are the same before any pruning
    seen = []
    layer = reference.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    for s in samples:
        reference(**s)
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen]).double()
    expected = select(ria_scores(layer.weight, x.norm(dim=0)), 0.5, "tensor")
    assert torch.equal(result.masks["model.layers.0.self_attn.q_proj"], expected)
    rows = expected.sum(1)
    assert rows.min() != rows.max(), "tensor-wide: rows keep different counts"


@pytest.mark.parametrize("impl", ["secateurs", "reference"])
def test_the_benchmark_measures_one_pass_in_process(tmp_path, capsys, impl):
    import json

    from bench_oneshot import main

    threads = torch.get_num_threads()
    try:  # the benchmark sets its own thread count; the tests after this one keep theirs
        main(["--smoke", "--nsamples", "2", "--seqlen", "16", "--one", impl, "wanda", "2:4", "--masks", str(tmp_path / "m.pt")])
    finally:
        torch.set_num_threads(threads)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["impl"] == impl and row["method"] == "wanda" and row["pattern"] == "2:4"
    masks = torch.load(tmp_path / "m.pt")
    assert len(masks) == 14 and all(check_nm(m, 2, 4) for m in masks.values())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_float32_sparsegpt_keeps_exact_counts_and_the_float64_quality(nm):
    samples = calibration_samples(_tokens(4000, 1), 8, 32)
    held_out = _tokens(2048, 7)
    a, b = _llama(), _llama()
    r64 = prune_oneshot(a, samples, "sparsegpt", 0.5, nm=nm)
    r32 = prune_oneshot(b, samples, "sparsegpt", 0.5, nm=nm, precision="float32")
    assert r32.sparsity == r64.sparsity == 0.5  # the exact-count check ran on every layer
    agree = sum(int((r32.masks[k] == v).sum()) for k, v in r64.masks.items()) / sum(v.numel() for v in r64.masks.values())
    assert agree > 0.99
    p64, p32 = perplexity(a, held_out, 32), perplexity(b, held_out, 32)
    assert abs(p32 - p64) / p64 < 0.005


def test_precision_is_checked_and_part_of_the_resume_state(tmp_path):
    from secateurs.errors import CheckpointError, ConfigError

    samples = calibration_samples(_tokens(4000, 1), 2, 16)
    with pytest.raises(ConfigError, match="precision must be one of float64, float32"):
        prune_oneshot(_llama(), samples, "sparsegpt", 0.5, precision="bf16")
    state = tmp_path / "state.pt"
    prune_oneshot(_llama(), samples, "sparsegpt", 0.5, state_path=str(state))
    with pytest.raises(CheckpointError, match="another one-shot run"):
        prune_oneshot(_llama(), samples, "sparsegpt", 0.5, state_path=str(state), precision="float32")
