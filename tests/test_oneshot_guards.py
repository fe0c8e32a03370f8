"""One-shot pruning refuses what it cannot do right, instead of pruning something else: blocks
that need their own arguments, layers the hooks never see, several block stacks, settings that
contradict each other, resume states of another run, sample forms it would misread."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from secateurs.engine import select  # noqa: E402
from secateurs.errors import CheckpointError, ConfigError  # noqa: E402
from secateurs.methods.oneshot import (  # noqa: E402
    _block_inputs, _output_hidden, calibration_samples, find_blocks, prune_oneshot, sparsegpt_prune_,
)


def _tokens(n=600, seed=0):
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))


def _gemma3():
    """Sliding-window and full-attention layers alternate: block 1 needs another mask than block 0."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_every_block_gets_the_arguments_the_model_gives_it():
    model = _gemma3()
    samples = calibration_samples(_tokens(), 2, 16)
    _, stack = find_blocks(model)
    inputs = _block_inputs(model, stack, samples)
    with torch.no_grad():
        expected = model(**samples[1], output_hidden_states=True).hidden_states
        h = inputs.hidden[1]
        for b, block in enumerate(stack[:-1]):
            h = _output_hidden(block(h, *inputs.args[b][1], **inputs.kwargs[b][1]))
            assert torch.equal(h, expected[b + 1]), f"block {b}"
        # the old behaviour, block 0's arguments for every block, is not the model's computation
        h = _output_hidden(stack[0](inputs.hidden[1], *inputs.args[0][1], **inputs.kwargs[0][1]))
        wrong = _output_hidden(stack[1](h, *inputs.args[0][1], **inputs.kwargs[0][1]))
        assert not torch.allclose(wrong, expected[2])


def test_layers_the_forward_never_calls_are_refused_for_data_driven_methods():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    samples = [torch.randn(1, 8, 16) for _ in range(2)]
    with pytest.raises(ConfigError, match=r"self_attn.out_proj saw no calibration tokens.*method='magnitude'"):
        prune_oneshot(Stack().eval(), samples, "wanda", 0.5)
    with pytest.warns(UserWarning, match="in_proj_weight"):  # left dense, and said
        prune_oneshot(Stack().eval(), samples, "magnitude", 0.5)


def test_several_block_stacks_are_refused_unless_one_is_named():
    class EncoderDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(3))
            self.decoder = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))

    with pytest.raises(ConfigError, match=r"2 separate stacks of blocks \('encoder', 'decoder'\).*blocks="):
        find_blocks(EncoderDecoder())
    assert find_blocks(EncoderDecoder(), "decoder")[0] == "decoder"


def test_contradicting_settings_are_refused():
    samples = calibration_samples(_tokens(), 2, 16)
    with pytest.raises(ConfigError, match=r"sparsity=0.7 contradicts nm=\(2, 4\)"):
        prune_oneshot(_llama(), samples, "wanda", 0.7, nm=(2, 4))
    with pytest.raises(ConfigError, match="give the sparsity"):
        prune_oneshot(_llama(), samples, "wanda")
    with pytest.raises(ConfigError, match="group='row' is not supported"):
        prune_oneshot(_llama(), samples, "sparsegpt", 0.5, group="row")
    with pytest.raises(ConfigError, match="contradicts the 2:4 group"):
        select(torch.rand(4, 8), 0.7, (2, 4))
    assert prune_oneshot(_llama(), samples, "wanda", nm=(2, 4)).sparsity == 0.5  # implied by the pattern


def test_tuple_samples_are_refused():
    x = _tokens()[:16][None]
    with pytest.raises(ConfigError, match="a calibration sample is a tuple"):
        prune_oneshot(_llama(), [(x, x)], "wanda", 0.5)


def test_layers_without_features_last_are_refused_for_data_driven_methods():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Conv1d(8, 8, 1)) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    with pytest.raises(ConfigError, match="Conv1d with a 3-D weight"):
        prune_oneshot(Conv(), [torch.randn(1, 8, 8)], "wanda", 0.5)


def test_a_resume_state_of_another_run_is_refused(tmp_path):
    samples = calibration_samples(_tokens(), 2, 16)
    state = tmp_path / "state.pt"
    prune_oneshot(_llama(), samples, "wanda", 0.5, state_path=str(state))
    with pytest.raises(CheckpointError, match="another one-shot run"):  # other calibration data
        prune_oneshot(_llama(), calibration_samples(_tokens(seed=1), 2, 16), "wanda", 0.5, state_path=str(state))
    with pytest.raises(CheckpointError, match="another one-shot run"):
        prune_oneshot(_llama(), samples, "wanda", 0.5, state_path=str(state), dampening=0.1)
    saved = torch.load(state, weights_only=False)
    del saved["weights"]["model.layers.0.mlp.up_proj"]
    torch.save(saved, state)
    with pytest.raises(CheckpointError, match="no weights for model.layers.0.mlp.up_proj"):
        prune_oneshot(_llama(), samples, "wanda", 0.5, state_path=str(state))


def test_sparsegpt_nm_ties_go_to_the_lowest_index_like_the_engine():
    w = torch.ones(3, 8, dtype=torch.float64)
    mask = sparsegpt_prune_(w.clone(), torch.eye(8, dtype=torch.float64), 0.5, nm=(2, 4), blocksize=8)
    assert torch.equal(mask, select(torch.ones(3, 8), 0.5, (2, 4)))
