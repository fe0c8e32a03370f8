"""One-shot pruning: comparison groups in the engine, Wanda, SparseGPT, and the block-by-block
sequencer with resume."""
import pytest
import torch
from torch import nn

from secateurs.allocation import keep_count
from secateurs.engine import select
from secateurs.errors import ConfigError
from secateurs.granularity import check_nm
from secateurs.methods.oneshot import (
    calibration_samples, find_blocks, prune_oneshot, sparsegpt_prune_, wanda_scores,
)


# -- comparison groups ----------------------------------------------------------------------------
def test_row_groups_keep_exactly_the_planned_count_in_every_row_with_ties_to_the_lowest_index():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 5.0, 4.0, 3.0, 2.0]])
    keep = select(scores, 0.6, "row")  # keep_count(5, 0.6) = 2 per row
    assert keep.tolist() == [[True, True, False, False, False], [True, True, False, False, False],
                             [False, True, True, False, False]]
    # [in, out] layout: rows run along axis 1
    assert torch.equal(select(scores.T, 0.6, "row", output_axis=1), keep.T)


def test_tensor_and_nm_groups():
    torch.manual_seed(0)
    s = torch.randn(8, 16)
    assert int(select(s, 0.75, "tensor").sum()) == keep_count(128, 0.75)
    assert check_nm(select(s, 0.5, (2, 4)), 2, 4)
    with pytest.raises(ConfigError, match="unknown comparison group"):
        select(s, 0.5, "column")


def test_wanda_is_weight_magnitude_times_input_norm_per_row_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-4.0, 1.0, 0.1, 2.0]])
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0], [1.0, 0.5, 0.0, 2.0]])  # tokens x inputs
    norms = x.norm(dim=0)  # [1.414, 0.5, 0, 2.828]
    scores = wanda_scores(w, norms)
    assert torch.allclose(scores.float(), w.abs() * norms)
    keep = select(scores, 0.5, "row")
    # row 0: scores [1.41, 1.0, 0.0, 1.41] -> keep inputs 0 and 3 (tie: lowest index first)
    # row 1: scores [5.66, 0.5, 0.0, 5.66] -> keep 0 and 3
    assert keep.tolist() == [[True, False, False, True], [True, False, False, True]]
    assert not torch.equal(keep, select(w.abs(), 0.5, "row"))  # magnitude alone keeps input 2 in row 0


# -- SparseGPT --------------------------------------------------------------------------------------
def _layer(rows=6, cols=16, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    return w, x, 2 * x.T @ x / tokens


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_the_layer_output_better_than_magnitude(nm):
    w, x, h = _layer()
    pruned = w.clone()
    mask = sparsegpt_prune_(pruned, h, 0.5, nm=nm, blocksize=8, dampening=0.01)
    magnitude = w * select(w.abs(), 0.5, nm if nm else "row")
    assert int(mask.sum()) == w.numel() // 2 and not pruned[~mask].any()
    if nm:
        assert check_nm(mask, *nm)
    err_sparsegpt = (x @ (w - pruned).T).norm()
    err_magnitude = (x @ (w - magnitude).T).norm()
    assert err_sparsegpt < 0.8 * err_magnitude


def _dense_obs(w, h, sparsity, dampening):
    """Optimal Brain Surgeon, column by column, with explicit inverses of the Hessian of the
    columns not yet visited (no Cholesky, no lazy batching): the reference SparseGPT must equal."""
    w = w.clone()
    h = h + dampening * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    cols = w.shape[1]
    inverses = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    saliency = w**2 / torch.stack([inv[0, 0] for inv in inverses])[None, :]
    n_prune = w.numel() - keep_count(w.numel(), sparsity)
    order = torch.sort(saliency.reshape(-1), stable=True).indices[:n_prune]
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[order] = False
    keep = keep.reshape(w.shape)
    for j in range(cols):
        inv = inverses[j]
        err = torch.where(keep[:, j], torch.zeros_like(w[:, j]), w[:, j]) / inv[0, 0]
        w[:, j:] -= err[:, None] * inv[0, :][None, :]
    return w * keep, keep


def test_sparsegpt_equals_a_dense_obs_computation_on_a_tiny_layer():
    w, _, h = _layer(rows=5, cols=10)
    expected, keep = _dense_obs(w, h, 0.5, 0.01)
    pruned = w.clone()
    mask = sparsegpt_prune_(pruned, h, 0.5, blocksize=10, dampening=0.01)
    assert torch.equal(mask, keep)
    torch.testing.assert_close(pruned, expected, atol=1e-9, rtol=0)


def test_lazy_block_updates_equal_one_block():
    w, _, h = _layer(rows=4, cols=16)
    a, b = w.clone(), w.clone()
    sparsegpt_prune_(a, h, 0.5, nm=(2, 4), blocksize=4)
    sparsegpt_prune_(b, h, 0.5, nm=(2, 4), blocksize=16)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_sparsegpt_bad_inputs_name_the_fix():
    w, _, h = _layer(rows=2, cols=6)
    with pytest.raises(ConfigError, match="not a multiple of m=4"):
        sparsegpt_prune_(w.clone(), h, 0.5, nm=(2, 4))
    with pytest.raises(ConfigError, match="not positive definite.*raise dampening"):
        sparsegpt_prune_(w.clone(), -torch.eye(6, dtype=torch.float64), 0.5, dampening=0.0)


# -- the sequencer ----------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _samples(n=6, seq=16):
    return calibration_samples(torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(2)), n, seq)


def test_blocks_are_found_or_named():
    assert find_blocks(_gpt2())[0] == "transformer.h"
    with pytest.raises(ConfigError, match="no stack of repeated blocks.*blocks="):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="has no module 'model.layers'"):
        find_blocks(_gpt2(), "model.layers")


def test_sequential_magnitude_equals_pruning_every_layer_at_once():
    model, reference = _gpt2(), _gpt2()
    result = prune_oneshot(model, _samples(), "magnitude", 0.5)
    params = dict(reference.named_parameters())
    for name, mask in result.masks.items():
        w = params[f"{name}.weight"]
        expected = select(w.abs(), 0.5, "row", output_axis=1)  # Conv1D: [in, out]
        assert torch.equal(mask, expected), name
    assert result.sparsity == 0.5


def test_wanda_on_the_first_block_uses_the_dense_inputs_and_later_blocks_the_pruned_ones():
    model, reference = _gpt2(), _gpt2()
    samples = _samples()
    result = prune_oneshot(model, samples, "wanda", 0.5)
    # block 0 sees the same inputs either way: recompute its first layer's masks by hand
    seen = []
    handle = reference.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    for s in samples:
        reference(**s)
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen]).double()
    w = reference.transformer.h[0].attn.c_attn.weight
    expected = select(wanda_scores(w, x.norm(dim=0), output_axis=1), 0.5, "row", output_axis=1)
    assert torch.equal(result.masks["transformer.h.0.attn.c_attn"], expected)


def test_a_killed_run_resumes_at_the_next_block_and_matches_an_uninterrupted_one(tmp_path):
    samples = _samples()
    whole = _gpt2()
    expected = prune_oneshot(whole, samples, "sparsegpt", 0.5)

    def die_after_block_1(b):
        if b == 1:
            raise KeyboardInterrupt

    model = _gpt2()
    state = tmp_path / "oneshot.pt"
    with pytest.raises(KeyboardInterrupt):
        prune_oneshot(model, samples, "sparsegpt", 0.5, state_path=str(state), on_block=die_after_block_1)
    pruned_blocks = []
    resumed = prune_oneshot(_gpt2(), samples, "sparsegpt", 0.5, state_path=str(state),
                            on_block=pruned_blocks.append)
    assert pruned_blocks == [2]  # blocks 0 and 1 were loaded, not pruned again
    for name in expected.masks:
        assert torch.equal(resumed.masks[name], expected.masks[name])
    with pytest.raises(Exception, match="another one-shot run"):
        prune_oneshot(_gpt2(), samples, "wanda", 0.5, state_path=str(state))


def test_resumed_weights_equal_the_uninterrupted_model(tmp_path):
    samples = _samples()
    whole = _gpt2()
    prune_oneshot(whole, samples, "sparsegpt", 0.5)
    state = str(tmp_path / "s.pt")
    with pytest.raises(KeyboardInterrupt):
        prune_oneshot(_gpt2(), samples, "sparsegpt", 0.5, state_path=state,
                      on_block=lambda b: (_ for _ in ()).throw(KeyboardInterrupt) if b == 0 else None)
    model = _gpt2()
    prune_oneshot(model, samples, "sparsegpt", 0.5, state_path=state)
    for (n, a), (_, b) in zip(whole.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n


def test_nm_on_conv1d_groups_inputs_along_axis_0_and_the_weights_are_masked():
    model = _gpt2()
    samples = _samples()
    result = prune_oneshot(model, samples, "wanda", nm=(2, 4))
    params = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert check_nm(mask, 2, 4, output_axis=1), name  # Conv1D is [in, out]: groups of 4 inputs per output
        assert torch.equal(params[f"{name}.weight"] != 0, mask), name


def test_calibration_shorter_than_one_sequence_is_refused():
    with pytest.raises(ConfigError, match="has 10 tokens, not more than one sequence of 16"):
        calibration_samples(torch.arange(10), 4, 16)


def test_nm_misfits_are_named_in_a_notice_and_stay_dense():
    from secateurs import PruningNotice

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=66, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.warns(PruningNotice, match=r"2:4 left 1 layer\(s\) of model.layers.0 dense .*down_proj \(66 inputs\)"):
        result = prune_oneshot(model, _samples(), "wanda", nm=(2, 4))
    assert result.masks["model.layers.0.mlp.down_proj"].all()
    assert check_nm(result.masks["model.layers.0.mlp.up_proj"], 2, 4)
