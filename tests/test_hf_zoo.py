"""The models people actually have: ten Hugging Face architectures, built raw from tiny configs
with random weights (no download), pruned with no wrapper code.

Oracles: ``torch.nn.utils.prune`` for global magnitude masks, the model's own Hugging Face loss
for the causal-LM default, an ``nn.Linear`` holding the transposed weight for every layout
question about ``Conv1D``, and hand counts for FLOPs.
"""
import warnings

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import secateurs  # noqa: E402
from secateurs import PruningNotice  # noqa: E402
from secateurs.allocation import keep_count  # noqa: E402
from secateurs.analysis.flops import layer_macs  # noqa: E402
from secateurs.errors import ConfigError  # noqa: E402
from secateurs.granularity import check_nm, nm_compatible, nm_mask  # noqa: E402
from secateurs.masks import Masks  # noqa: E402
from secateurs.methods import SNIP, NMSparsifier, RigL, SynFlow  # noqa: E402
from secateurs.outputs import logits_of, task_loss  # noqa: E402
from secateurs.regrowth import regrow_by_cosine  # noqa: E402

T = transformers
VOCAB, SEQ = 100, 16


def _zoo():
    return {
        "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=10)),
        "mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            image_size=32, depth_multiplier=0.25, num_labels=10)),
        "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=10)),
        "efficientnet": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
            image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=10)),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=10)),
        "deit": lambda: T.DeiTForImageClassification(T.DeiTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=10)),
        "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
            num_labels=10)),
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=3)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)),
    }


ZOO = list(_zoo())
TEXT = {"bert", "gpt2", "llama"}
CAUSAL = {"gpt2", "llama"}


def build(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _zoo()[name]()


def batch(name, size=4):
    """One batch the way users hold it: (pixels, labels), or a tokenizer-style mapping."""
    g = torch.Generator().manual_seed(1)
    if name not in TEXT:
        return torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)
    ids = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    if name in CAUSAL:
        return {"input_ids": ids}  # the targets are the inputs, shifted
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (size,), generator=g)}


def inputs_of(name, b):
    return {k: v for k, v in b.items() if k != "labels"} if isinstance(b, dict) else b[0]


def expected_prunable(model):
    """Independent oracle: the weights of every Linear / Conv / Conv1D, minus weights shared
    with an embedding, under the names named_parameters() reports."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        canonical[id(m.weight)]
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)) and id(m.weight) not in embedded
    }


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningNotice)
        return fn(*a, **kw)


@pytest.mark.parametrize("name", ZOO)
def test_default_prunable_set_is_every_layer_and_no_embedding(name):
    model = build(name)
    masks = quiet(Masks, model)
    assert set(masks.names()) == expected_prunable(model)
    named = dict(model.named_parameters())
    assert all(n in named for n in masks.names())  # every stored name resolves on the model
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    assert not any(id(p) in embeddings for p in masks.params.values())
    if name == "gpt2":
        assert sum(isinstance(m, Conv1D) for m in model.modules()) == 8
        assert all(masks.output_axes[n] == 1 for n in masks.names())


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("scope", ["global", "uniform", "erk"])
def test_exact_counts_for_every_scope(name, scope):
    model = build(name)
    # a tiny random-init head can lose every weight to a global threshold: exactness is the point here
    s = quiet(secateurs.Magnitude, model, sparsity=0.7, scope=scope, allow_layer_collapse=True)
    s.prune()
    numel, active = s.masks.numel(), s.masks.active()
    total = sum(numel.values())
    if scope == "uniform":
        assert all(active[n] == keep_count(numel[n], 0.7) for n in numel)
    else:
        assert sum(active.values()) == keep_count(total, 0.7)
    for n, p in s.masks.params.items():  # the model holds exactly the masks
        assert torch.equal(p != 0, s.masks[n])


@pytest.mark.parametrize("name", ZOO)
def test_global_magnitude_equals_torch_prune(name):
    model, oracle = build(name), build(name)
    s = quiet(secateurs.Magnitude, model, sparsity=0.8, scope="global", allow_layer_collapse=True)
    s.prune()
    params = dict(oracle.named_parameters())
    modules = dict(oracle.named_modules())
    pairs = [(modules[n.rpartition(".")[0]], "weight") for n in s.masks.names()]
    for n in s.masks.names():
        assert modules[n.rpartition(".")[0]].weight is params[n]
    tprune.global_unstructured(pairs, pruning_method=tprune.L1Unstructured, amount=0.8)
    for (module, _), n in zip(pairs, s.masks.names()):
        assert torch.equal(module.weight_mask.bool(), s.masks[n]), n


@pytest.mark.parametrize("name", ZOO)
def test_masks_survive_adam_steps_and_the_tied_embedding_stays_dense(name):
    model = build(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    s = quiet(secateurs.Magnitude, model, opt, sparsity=0.9, scope="global", allow_layer_collapse=True)
    s.prune()
    b = batch(name)
    for _ in range(2):
        out = model(**inputs_of(name, b)) if isinstance(b, dict) else model(b[0])
        loss = task_loss(model, out, b.get("labels") if isinstance(b, dict) else b[1], inputs_of(name, b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        s.step()
    for n, p in s.masks.params.items():
        pruned = ~s.masks[n]
        assert not p[pruned].any()
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert not value[pruned].any()
    assert s.stats()["sparsity"] == pytest.approx(0.9, abs=1e-4)
    if name == "gpt2":
        assert (model.transformer.wte.weight != 0).all()  # the embedding (= lm_head) was never pruned


@pytest.mark.parametrize("name", ZOO)
def test_rigl_swaps_conserve_every_layers_count(name):
    model = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    s = quiet(RigL, model, opt, sparsity=0.8, total_steps=10, every=1)
    before = s.masks.active()
    old = {n: m.clone() for n, m in s.masks.masks.items()}
    b = batch(name)
    out = model(**inputs_of(name, b)) if isinstance(b, dict) else model(b[0])
    task_loss(model, out, b.get("labels") if isinstance(b, dict) else b[1], inputs_of(name, b)).backward()
    opt.step()
    s.step()
    assert s.history[-1]["kind"] == "swap"
    assert s.masks.active() == before
    assert any(not torch.equal(old[n], s.masks[n]) for n in old)


@pytest.mark.parametrize("name", ZOO)
def test_snip_and_synflow_run_on_the_raw_model(name):
    b = batch(name)
    model = build(name)
    snip = quiet(SNIP, model, batches=lambda: [b], scope="erk")
    stats = snip.prune(0.8)
    assert stats["active"] == keep_count(stats["numel"], 0.8)
    model = build(name)
    x = inputs_of(name, b)
    shape = tuple((x["input_ids"] if isinstance(x, dict) else x).shape[1:])
    synflow = quiet(SynFlow, model, input_shape=shape, rounds=4, scope="erk")
    stats = synflow.prune(0.8)
    assert stats["active"] == keep_count(stats["numel"], 0.8)


@pytest.mark.parametrize("name", ZOO)
def test_two_four_is_exact_on_every_eligible_layer_and_the_rest_stay_dense(name):
    model = build(name)
    with pytest.warns(PruningNotice) if name in ("efficientnet", "mobilenet_v2", "resnet", "convnext") else warnings.catch_warnings():
        s = quiet(NMSparsifier, model, n=2, m=4) if name not in ("efficientnet", "mobilenet_v2", "resnet", "convnext") \
            else NMSparsifier(model, n=2, m=4)
    s.prune()
    for n, p in s.masks.params.items():
        axis = s.masks.output_axes[n]
        if nm_compatible(p.shape, 4, axis):
            assert n in s.covered and check_nm(s.masks[n], 2, 4, axis), n
        else:  # a stem conv with 3 input channels, a depthwise conv with fan-in 9, ...
            assert n in s.left_dense and s.masks[n].all(), n


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_round_trip_on_a_fresh_model(name):
    model = build(name)
    s = quiet(secateurs.Magnitude, model, sparsity=0.6, scope="erk")
    s.prune()
    state = s.state_dict()
    other = build(name)
    t = quiet(secateurs.Magnitude, other, sparsity=0.6, scope="erk")
    t.load_state_dict(state)
    for n in s.masks.names():
        assert torch.equal(s.masks[n], t.masks[n])
        assert not dict(other.named_parameters())[n][~t.masks[n]].any()


# -- Conv1D's [in, out] layout, against an nn.Linear holding the transposed weight -----------
def _pair():
    torch.manual_seed(3)
    conv1d = Conv1D(nf=12, nx=8)  # 8 inputs, 12 outputs, weight [8, 12]
    linear = nn.Linear(8, 12)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.T)
        linear.bias.copy_(conv1d.bias)
    return conv1d, linear


def test_conv1d_nm_groups_run_along_its_inputs():
    conv1d, linear = _pair()
    a = nm_mask(conv1d.weight.abs(), 2, 4, output_axis=1)
    b = nm_mask(linear.weight.abs(), 2, 4)
    assert torch.equal(a, b.T)
    assert check_nm(a, 2, 4, output_axis=1) and not check_nm(a, 2, 4)  # wrong axis: not 2:4
    s = NMSparsifier(nn.Sequential(conv1d), n=2, m=4)
    s.prune()
    assert torch.equal(s.masks["0.weight"], b.T)


def test_conv1d_macs_and_cosine_scores_match_the_linear():
    conv1d, linear = _pair()
    x = torch.randn(5, 3, 8)
    assert torch.allclose(conv1d(x), linear(x), atol=1e-6)
    assert layer_macs(nn.Sequential(conv1d), x) == {"0.weight": 3 * 8 * 12}
    assert layer_macs(nn.Sequential(linear), x) == {"0.weight": 3 * 8 * 12}
    a = regrow_by_cosine(nn.Sequential(conv1d), {"0.weight": conv1d.weight}, x)["0.weight"]
    b = regrow_by_cosine(nn.Sequential(linear), {"0.weight": linear.weight}, x)["0.weight"]
    assert a.shape == conv1d.weight.shape and torch.allclose(a, b.T)


def test_gpt2_macs_count_every_conv1d_by_hand():
    model = build("gpt2")
    ids = torch.randint(0, VOCAB, (2, SEQ))
    macs = layer_macs(model, {"input_ids": ids})
    d, h = 32, 128
    per_block = SEQ * (d * 3 * d + d * d + d * h + h * d)
    assert sum(v for k, v in macs.items() if ".h." in k) == 2 * per_block
    assert macs["transformer.wte.weight"] == SEQ * d * VOCAB  # lm_head, under its canonical name


# -- any output, any input ----------------------------------------------------------------------
def test_default_causal_lm_loss_is_the_models_own_loss():
    for name in CAUSAL:
        model = build(name).eval()  # no dropout: two calls, one function
        ids = batch(name)["input_ids"]
        ours = task_loss(model, model(input_ids=ids), None, {"input_ids": ids})
        assert torch.allclose(ours, model(input_ids=ids, labels=ids).loss, atol=1e-6)


def test_logits_are_found_in_every_output_form():
    logits = torch.randn(2, 3)
    output = T.modeling_outputs.SequenceClassifierOutput(logits=logits)
    for form in (logits, (logits, None), [logits], {"logits": logits}, output):
        assert logits_of(form) is logits
    with pytest.raises(ConfigError, match="cannot find the logits"):
        logits_of({"last_hidden_state": logits})


# -- bad input -----------------------------------------------------------------------------------
class _Bilinearish(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.weight


def test_a_model_with_no_prunable_weights_says_how_to_choose_them():
    with pytest.raises(ConfigError, match="no prunable parameters.*include=.*register_layer"):
        Masks(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)))


def test_an_unregistered_layer_type_is_named_with_how_to_register_it():
    model = nn.Sequential(nn.Linear(4, 4), _Bilinearish())
    with pytest.warns(PruningNotice, match=r"1\.weight \(_Bilinearish\).*register_layer\(_Bilinearish"):
        masks = Masks(model)
    assert masks.names() == ["0.weight"]
    with pytest.raises(ConfigError, match="not registered layer types.*register_layer\\(_Bilinearish"):
        Masks(model, types=[_Bilinearish])
    with pytest.raises(ConfigError, match="N:M groups run along a layer's inputs.*register_layer"):
        NMSparsifier(model, n=2, m=4, include=["1.weight"])
    secateurs.register_layer(_Bilinearish, output_axis=1)
    try:
        assert Masks(model).names() == ["0.weight", "1.weight"]
    finally:
        from secateurs.layers import _BY_CLASS
        del _BY_CLASS[_Bilinearish]


def test_multihead_attentions_in_proj_weight_is_named_not_silently_skipped():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32)
    with pytest.warns(PruningNotice, match=r"self_attn\.in_proj_weight \(MultiheadAttention\)"):
        masks = Masks(layer)
    assert "self_attn.out_proj.weight" in masks.names()
    assert "self_attn.in_proj_weight" in Masks(layer, include=["*weight"]).names()


def test_a_tied_weight_is_left_out_with_a_notice_and_included_by_any_alias():
    model = build("gpt2")
    with pytest.warns(PruningNotice, match="transformer.wte.weight = lm_head.weight.*include="):
        Masks(model)
    for alias in ("lm_head.weight", "transformer.wte.weight"):
        with pytest.warns(PruningNotice, match="one tied parameter"):
            masks = Masks(model, include=[alias])
        assert masks.names() == ["transformer.wte.weight"]  # one canonical name
    s = quiet(secateurs.Magnitude, model, sparsity=0.5, include=["lm_head.weight"])
    s.prune()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (model.lm_head.weight == 0).float().mean() == pytest.approx(0.5, abs=1e-3)


def test_snip_reports_a_batch_without_targets():
    model = build("bert")
    b = {"input_ids": torch.randint(0, VOCAB, (2, SEQ))}
    with pytest.raises(ConfigError, match="no targets"):
        quiet(SNIP, model, batches=lambda: [b]).prune(0.5)


def test_lottery_ticket_rounds_on_gpt2_prune_the_conv1d_layers_and_rewind():
    from secateurs.methods import LotteryTicket

    model = build("gpt2")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = quiet(LotteryTicket, model, opt, rate=0.2, rewind_step=0)
    b = batch("gpt2")
    task_loss(model, model(**b), None, b).backward()
    opt.step()
    ticket.step()
    ticket.next_round()
    assert ticket.stats()["sparsity"] == pytest.approx(0.2, abs=1e-3)
    for n in ticket.masks.names():  # kept weights rewound to their initial values
        p = dict(model.named_parameters())[n]
        assert torch.equal(p[ticket.masks[n]], initial[n][ticket.masks[n]])
    assert (model.transformer.wte.weight != 0).all()  # the tied embedding is not pruned
