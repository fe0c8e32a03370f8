"""Any model input, any model output: the one place that calls a user's model.

Methods that run the model (SNIP, GraSP, SynFlow, Taylor, CTRE, FLOPs counting) accept what
people actually feed and get back:

* **inputs**: a tensor (``model(x)``), a tuple or list (``model(*x)``) or a mapping
  (``model(**x)``, a Hugging Face batch);
* **batches**: ``(inputs, targets)`` pairs, or a mapping whose ``"labels"`` entry holds the
  targets and whose other entries are the inputs (the Hugging Face convention);
* **outputs**: a tensor, a tuple or list (the first element), or a mapping / ``ModelOutput``
  with ``logits`` (Hugging Face documents ``.logits`` as the prediction scores of every task
  head);
* **losses**: cross-entropy on the logits, and for a causal language model (a
  ``...ForCausalLM`` / ``...LMHeadModel`` class, or ``config.is_decoder``) the shifted
  next-token cross-entropy, with targets defaulting to the input ids as in ``transformers``.
  A user's ``loss_fn(logits, targets)`` overrides it.

Nothing here imports ``transformers``: outputs are recognised by their ``logits`` field.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["split_batch", "call_model", "logits_of", "is_causal_lm", "task_loss", "first_tensor", "LossFn"]

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


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (its loss shifts the targets by one)."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_decoder", False)) and not getattr(config, "is_encoder_decoder", False)


def task_loss(model: nn.Module, output: Any, targets: Any, inputs: Any = None, loss_fn: LossFn | None = None) -> torch.Tensor:
    """The training loss of one batch: ``loss_fn(logits, targets)`` if given, else cross-entropy,
    shifted by one position for a causal language model (targets default to the input ids;
    ``-100`` is ignored, as in ``transformers``)."""
    logits = logits_of(output)
    if loss_fn is not None:  # the user's loss decides what it needs (targets may be None)
        return loss_fn(logits, targets)
    causal = is_causal_lm(model)
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
        if logits.dim() != 3 or targets.shape != logits.shape[:2]:
            raise ConfigError(
                f"a causal LM's logits should be [batch, tokens, vocab] and its targets [batch, tokens]; "
                f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=-100
        )
    if logits.dim() == 3 and isinstance(targets, torch.Tensor) and targets.shape == logits.shape[:2]:
        # one label per token (token classification)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return F.cross_entropy(logits, targets)
