"""The default loss of a model whose task is not written on its class, and data arguments
checked without being iterated."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from secateurs.errors import ConfigError
from secateurs.outputs import batch_pass, batch_source, next_token_loss, per_token_loss, task_loss

VOCAB = 50


class _Wrapper(nn.Module):
    """A user's module around a Hugging Face model, returning its logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids).logits


def _tiny(kind):
    T = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "gpt2":
            config = T.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
            return T.GPT2LMHeadModel(config).eval()
        config = T.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, num_labels=5)
        return T.BertForTokenClassification(config).eval()


def test_a_wrapped_causal_lm_gets_the_models_own_shifted_loss():
    torch.manual_seed(0)
    lm = _tiny("gpt2")
    wrapper, ids = _Wrapper(lm), torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        own = lm(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(task_loss(wrapper, wrapper(ids), ids, ids), own)
        torch.testing.assert_close(task_loss(wrapper, wrapper(ids), None, {"input_ids": ids}), own)  # targets = ids
        unshifted = per_token_loss(wrapper(ids), ids)
    assert not torch.isclose(unshifted, own)  # the two objectives differ: shifting matters here


def test_token_classification_stays_unshifted_and_equals_the_models_own_loss():
    torch.manual_seed(0)
    model = _tiny("bert")
    ids, labels = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, 5, (2, 8))
    with torch.no_grad():
        out = model(input_ids=ids)
        torch.testing.assert_close(task_loss(model, out, labels, {"input_ids": ids}),
                                   model(input_ids=ids, labels=labels).loss)


class _Tagger(nn.Module):
    """Per-token logits from a plain module: language model or tagger, nothing says which."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_per_token_logits_of_a_model_whose_task_is_unknown_are_refused_and_loss_fn_decides():
    from secateurs.scores import snip

    torch.manual_seed(0)
    model, ids = _Tagger(), torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(ConfigError, match="_Tagger returns per-token logits.*ambiguous.*loss_fn=secateurs.outputs"):
        task_loss(model, model(ids), ids, ids)
    weights = {"out.weight": model.out.weight}
    with pytest.raises(ConfigError, match="ambiguous"):
        snip(model, weights, [(ids, ids)])
    logits = model(ids)
    torch.testing.assert_close(task_loss(model, logits, ids, ids, per_token_loss),
                               nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1)))
    torch.testing.assert_close(task_loss(model, logits, ids, ids, next_token_loss),
                               nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))
    # a 1-D segmentation output [batch, classes, length] with targets [batch, length] is not ambiguous
    seg, y = torch.randn(2, 3, 8), torch.randint(0, 3, (2, 8))
    torch.testing.assert_close(task_loss(nn.Identity(), seg, y), nn.functional.cross_entropy(seg, y))


class _CountingLoader:
    """A re-iterable data source that counts how often it is iterated (a DataLoader with
    workers starts them on every iter())."""

    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)


def test_data_arguments_are_checked_without_being_iterated():
    loader = _CountingLoader([(torch.zeros(1, 2), torch.zeros(1))])
    fresh = batch_source(loader)
    assert batch_pass(loader) is loader and loader.iterations == 0
    assert len(list(fresh())) == 1 and loader.iterations == 1
    with pytest.raises(ConfigError, match="one-shot iterator"):
        batch_source(iter([1]))
    with pytest.raises(ConfigError, match="not an iterable"):
        batch_pass(lambda: 3)
