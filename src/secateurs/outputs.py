"""Any model input, any model output: the one place that calls a user's model.

Methods that run the model (SNIP, GraSP, SynFlow, Taylor, CTRE, FLOPs counting) accept what
people actually feed and get back:

* **inputs**: a tensor (``model(x)``), a tuple or list (``model(*x)``) or a mapping
  (``model(**x)``, a Hugging Face batch);
* **batches**: ``(inputs, targets)`` pairs, or a mapping whose ``"labels"`` entry holds the
  targets and whose other entries are the inputs (the Hugging Face convention);
* **data arguments** (``batches=`` of SNIP, GraSP, SynFlow, CTRE, :class:`~secateurs.grow.Grower`,
  :meth:`~secateurs.grow.GrowPrune.event`, ...): one convention, an iterable of such batches
  (a list, an unshuffled ``DataLoader``); a zero-argument callable returning one is accepted
  too. An object used over a whole run must be iterable more than once, so a one-shot
  generator is refused there (:func:`batch_source`); a one-pass use takes anything
  (:func:`batch_pass`);
* **outputs**: a tensor, a tuple or list (the first element), or a mapping / ``ModelOutput``
  with ``logits`` (Hugging Face documents ``.logits`` as the prediction scores of every task
  head);
* **losses**: cross-entropy on the logits, and for a causal language model (a
  ``...ForCausalLM`` / ``...LMHeadModel`` class, or ``config.is_decoder``, or a module whose
  per-token logits come from such a model inside it) the shifted next-token cross-entropy,
  with targets defaulting to the input ids as in ``transformers``. One label per token is
  scored unshifted only for a model that is clearly per-token (``...ForTokenClassification``,
  or an encoder-decoder, whose logits already align with its labels); any other model with
  per-token logits is refused as ambiguous. A user's ``loss_fn(logits, targets)`` overrides
  it (:func:`next_token_loss` and :func:`per_token_loss` are ready-made ones).

Nothing here imports ``transformers``: outputs are recognised by their ``logits`` field.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = [
    "split_batch", "call_model", "logits_of", "is_causal_lm", "task_loss", "next_token_loss", "per_token_loss",
    "first_tensor", "LossFn",
    "batch_source", "batch_pass", "model_failure",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: the Hugging Face name of the targets inside a batch mapping
LABELS = "labels"


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch; targets may be None (a mapping without labels)."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != LABELS}
        if not inputs:
            raise ConfigError("a batch mapping holds only 'labels'; it needs the model's inputs too (e.g. input_ids)")
        return inputs, batch.get(LABELS)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(
        f"a batch must be an (inputs, targets) pair or a mapping of model inputs with 'labels', "
        f"got {type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}"
    )


def _not_one_batch(batches: Any, what: str) -> None:
    """Refuse a single batch given where an iterable of batches is expected (iterating it
    would yield its tensors, or a mapping's keys, one by one)."""
    if isinstance(batches, Mapping) or (
        isinstance(batches, (tuple, list)) and batches and isinstance(batches[0], torch.Tensor)
    ):
        raise ConfigError(
            f"{what} looks like one batch ({type(batches).__name__} of "
            f"{'tensors' if not isinstance(batches, Mapping) else 'model inputs'}), not an iterable of batches; "
            f"wrap it in a list: {what}=[batch]"
        )


def _iterable_from(result: Any, what: str) -> Iterable:
    _not_one_batch(result, what)
    # iterable as iter() sees it, without calling it (a DataLoader's iter starts its workers)
    if getattr(type(result), "__iter__", None) is None and not hasattr(type(result), "__getitem__"):
        raise ConfigError(
            f"{what} gave a {type(result).__name__}, not an iterable of (x, y) batches; pass a list of "
            "batches or a DataLoader"
        )
    return result


def batch_source(batches: Any, what: str = "batches") -> Callable[[], Iterable] | None:
    """The one form of a data argument used over a whole run: a zero-argument callable that
    returns a fresh iterable of batches on every call (None stays None).

    ``batches`` is an iterable that can be iterated again (a list, a ``DataLoader``: each
    call iterates it afresh), or a zero-argument callable returning an iterable (e.g.
    ``lambda: loader``). Methods draw batches as they need them and, on resume, draw the same
    number again, so the data must come in the same order on every pass (an unshuffled
    loader). A one-shot iterator (a generator, ``iter(loader)``, ``itertools.islice``) is
    refused: it would be empty after its first pass and a resumed run could not replay it.
    """
    if batches is None:
        return None
    if not hasattr(batches, "__iter__") and callable(batches):
        def fresh() -> Iterable:
            return _iterable_from(batches(), f"{what}()")
        return fresh
    _iterable_from(batches, what)
    if isinstance(batches, Iterator):
        raise ConfigError(
            f"{what} is a one-shot iterator ({type(batches).__name__}): it is empty after one pass and a resumed "
            f"run could not draw the same batches again; pass a list (e.g. {what}=list(itertools.islice(loader, n))), "
            f"a DataLoader, or a zero-argument callable returning a fresh iterable ({what}=lambda: ...)"
        )
    return lambda: batches


def batch_pass(batches: Any, what: str = "batches") -> Iterable | None:
    """A data argument used for one pass (one event, one score): an iterable of batches (a
    one-shot generator is fine here), or a zero-argument callable returning one, which is
    called once. None stays None."""
    if batches is None:
        return None
    if not hasattr(batches, "__iter__") and callable(batches):
        return _iterable_from(batches(), f"{what}()")
    return _iterable_from(batches, what)


def model_failure(err: BaseException, limit: int = 300) -> str:
    """One line naming what the model raised: the innermost cause of ``err`` (fx and
    functional wrappers add layers of context around it), its first line, at most ``limit``
    characters."""
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def call_model(model: nn.Module, inputs: Any, *, through: Callable | None = None) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)`` by the type of ``inputs``.

    ``through(model, args, kwargs)`` replaces the plain call (e.g. a ``functional_call`` with
    substituted weights)."""
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    if through is not None:
        return through(model, args, kwargs)
    return model(*args, **kwargs)


def first_tensor(inputs: Any) -> torch.Tensor:
    """The first tensor in ``inputs`` (for its batch size and device)."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise ConfigError(f"the model inputs hold no tensor (got {type(inputs).__name__})")


def logits_of(output: Any) -> torch.Tensor:
    """The prediction scores in a model's output."""
    if isinstance(output, torch.Tensor):
        return output
    logits = None
    if isinstance(output, Mapping):
        logits = output.get("logits")
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(
            f"cannot find the logits in a model output of type {type(output).__name__}: expected a tensor, "
            "a tuple whose first element is the logits, or a mapping / ModelOutput with 'logits'; "
            "a model without a task head (e.g. a bare encoder) needs a loss_fn of its own"
        )
    return logits


_CAUSAL_CLASSES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (its loss shifts the targets by one)."""
    name = type(model).__name__
    if name.endswith(_CAUSAL_CLASSES):
        return True
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_decoder", False)) and not getattr(config, "is_encoder_decoder", False)


def _per_token_task(model: nn.Module) -> bool:
    """Whether ``model``'s per-token logits align with its labels (no shift): token
    classification, or an encoder-decoder (its decoder's inputs are the shifted labels)."""
    config = getattr(model, "config", None)
    return type(model).__name__.endswith("ForTokenClassification") or bool(getattr(config, "is_encoder_decoder", False))


def _causal_lm_inside(model: nn.Module, vocab: int) -> nn.Module | None:
    """A ``...ForCausalLM`` / ``...LMHeadModel`` inside ``model`` (a user's wrapper) whose
    vocabulary is the width of the logits ``model`` returned."""
    for name, m in model.named_modules():
        if not name or not type(m).__name__.endswith(_CAUSAL_CLASSES):
            continue
        head = m.get_output_embeddings() if callable(getattr(m, "get_output_embeddings", None)) else None
        widths = {getattr(getattr(m, "config", None), "vocab_size", None),
                  getattr(getattr(head, "weight", None), "shape", (None,))[0]}
        if vocab in widths:
            return m
    return None


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A causal LM's loss: position ``t`` predicts token ``t + 1`` (``-100`` ignored)."""
    if logits.dim() != 3 or not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:2]:
        raise ConfigError(
            f"a causal LM's logits should be [batch, tokens, vocab] and its targets [batch, tokens]; "
            f"got {tuple(logits.shape)} and {tuple(getattr(targets, 'shape', ())) or type(targets).__name__}"
        )
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=-100)


def per_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One label per token, unshifted (token classification; ``-100`` ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def task_loss(model: nn.Module, output: Any, targets: Any, inputs: Any = None, loss_fn: LossFn | None = None) -> torch.Tensor:
    """The training loss of one batch: ``loss_fn(logits, targets)`` if given, else cross-entropy,
    shifted by one position for a causal language model (targets default to the input ids;
    ``-100`` is ignored, as in ``transformers``). Per-token logits with one target per token
    from a model that is neither a causal LM (nor wraps one) nor clearly per-token are refused:
    shifting or not would be a guess."""
    logits = logits_of(output)
    if loss_fn is not None:  # the user's loss decides what it needs (targets may be None)
        return loss_fn(logits, targets)
    causal = is_causal_lm(model) or (
        logits.dim() == 3 and not _per_token_task(model) and _causal_lm_inside(model, logits.shape[-1]) is not None
    )
    if targets is None:
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
        if causal and isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            targets = ids
        else:
            raise ConfigError(
                "this batch has no targets: pass (inputs, targets) pairs or a mapping with 'labels' "
                "(only a causal language model takes its targets from its input ids)"
            )
    if causal:
        return next_token_loss(logits, targets)
    if logits.dim() == 3 and isinstance(targets, torch.Tensor) and targets.shape == logits.shape[:2]:
        if not _per_token_task(model):
            raise ConfigError(
                f"{type(model).__name__} returns per-token logits {tuple(logits.shape)} with one target per token, "
                "but its task is ambiguous: a causal language model predicts the next token (targets shifted by "
                "one), token classification labels each token (unshifted); pass loss_fn=secateurs.outputs."
                "next_token_loss or loss_fn=secateurs.outputs.per_token_loss (or your own loss_fn(logits, targets))"
            )
        return per_token_loss(logits, targets)
    return F.cross_entropy(logits, targets)
