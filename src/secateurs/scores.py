"""Importance scores: higher means more worth keeping.

A score is a pure function ``score(weights, generator) -> {name: tensor}`` with one tensor per
prunable weight, shaped like it. The generator is passed in (never global) so random scores
are reproducible and checkpointable.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import ConfigError, SecateursError
from .masks import unwrap_model
from .outputs import LossFn, call_model, logits_of, model_failure, split_batch, task_loss


class Score(Protocol):
    def __call__(
        self, weights: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]: ...


def magnitude(weights: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """|w| (Han et al. 2015; Frankle & Carbin 2019): small weights matter least."""
    return {n: w.detach().abs() for n, w in weights.items()}


def random(weights: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform noise: the control every criterion must beat (drawn on CPU, so identical on any
    device for a given generator state)."""
    return {
        n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in weights.items()
    }


# -- pruning at initialisation ------------------------------------------------------------
# These scores look at the network, not only at the weights: ``score(model, weights, ...)``.
# A method binds the extra arguments (batches, input shape) into the two-argument form above.
# Each one scores the network as it is *now*, i.e. the masked network (pruned weights are
# zero in the live model), and leaves the model exactly as it found it: parameter and buffer
# values, ``.grad`` (None stays None), every module's train/eval flag and the global RNG
# streams. The model is evaluated with :func:`torch.func.functional_call` on detached copies
# of the weights, so the live parameters are never written and no ``.grad`` accumulates.


def _leaves(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh leaf tensors holding the weights' values, to differentiate with respect to."""
    return {n: w.detach().clone().requires_grad_(True) for n, w in weights.items()}


def _buffer_copies(model: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Copies of the buffers, so batch norm in train mode updates copies, not the model."""
    out = {}
    for name, b in model.named_buffers():
        out[name] = transform(b) if transform is not None and b.is_floating_point() else b.detach().clone()
    return out


def _fork_rng(model: nn.Module):
    """Fork the CPU RNG and the RNG of every CUDA device the model lives on."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    if cuda:
        return torch.random.fork_rng(devices=cuda, device_type="cuda")
    return torch.random.fork_rng(devices=[])


@contextmanager
def _scoring(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Enable grad, optionally switch to eval mode, and fork the RNG; restore all on exit.

    Forking the RNG means dropout during scoring does not shift the random stream the training
    run sees afterwards. Every module's own ``training`` flag is restored (a model may mix
    modes, e.g. frozen batch norm).
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        with _fork_rng(model), torch.enable_grad():
            if eval_mode:
                model.eval()
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _forward(model: nn.Module, tensors: Mapping[str, torch.Tensor], inputs) -> object:
    """The model's output on ``inputs`` (a tensor, tuple or mapping: see
    :mod:`secateurs.outputs`) with ``tensors`` substituted for its parameters and buffers."""
    return call_model(
        model, inputs, through=lambda m, args, kwargs: functional_call(m, dict(tensors), args, kwargs, strict=False)
    )


def _grads(output: torch.Tensor, leaves: Mapping[str, torch.Tensor], **kw) -> dict[str, torch.Tensor]:
    """d output / d leaves; a weight the output does not depend on gets a zero gradient."""
    grads = torch.autograd.grad(output, list(leaves.values()), allow_unused=True, **kw)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}


def _batches(batches: Iterable, what: str) -> list:
    """The batches as ``(inputs, targets)`` pairs (targets may be None for a causal LM)."""
    out = [split_batch(b) for b in batches]
    if not out:
        raise ConfigError(
            f"{what} needs at least one (x, y) batch, but the batches iterable was empty; "
            "pass a non-empty list or loader of (inputs, targets)"
        )
    return out


def snip(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    batches: Iterable,
    loss_fn: LossFn | None = None,
) -> dict[str, torch.Tensor]:
    """Connection sensitivity ``|g ⊙ w|`` (Lee et al. 2019, SNIP): the paper's
    ``s_j = |∂L/∂c_j| / Σ_k |∂L/∂c_k|`` at mask ``c = 1``, with ``∂L/∂c_j = w_j g_j`` for the
    weight gradient ``g = ∂L/∂w``.

    Removing connection ``j`` changes the loss by about ``g_j * w_j`` to first order, so the
    connections whose removal would change the loss least go first. ``g`` is the gradient of
    the loss summed over ``batches`` (a list or iterable of ``(x, y)``; several batches act as
    one larger batch), taken at the *current*, masked weights; the paper's normalisation by
    the sum of all scores is dropped because it does not change any ranking. The model runs in
    the mode it is in (batch norm uses batch statistics in train mode; its running statistics
    are not updated). Inputs, outputs and the default loss follow :mod:`secateurs.outputs`
    (cross-entropy on the logits, next-token for a causal LM); ``loss_fn(logits, targets)``
    overrides the loss.
    """
    model = unwrap_model(model)
    batches = _batches(batches, "snip")
    with _scoring(model, eval_mode=False):
        leaves = _leaves(weights)
        total = {n: torch.zeros_like(t) for n, t in leaves.items()}
        for x, y in batches:
            loss = task_loss(model, _forward(model, {**_buffer_copies(model), **leaves}, x), y, x, loss_fn)
            for n, g in _grads(loss, leaves).items():
                total[n] += g
    return {n: (total[n] * weights[n].detach()).abs() for n in weights}


def grasp(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    batches: Iterable,
    loss_fn: LossFn | None = None,
    temperature: float = 200.0,
) -> dict[str, torch.Tensor]:
    """Gradient signal preservation, returned as a keep score ``θ ⊙ Hg`` (Wang et al. 2020).

    GraSP's importance score is ``S(-θ) = -θ ⊙ Hg``: removing weight ``q`` (``δ = -θ_q e_q``)
    changes the gradient norm ``gᵀg`` by about ``2 δᵀHg = 2 S_q``, and GraSP removes those with
    the *largest* ``S``, whose removal reduces the gradient flow least (or increases it most);
    its reference code keeps the weights with ``S`` at or below the pruning threshold. With
    the library's "higher = keep" convention the score is therefore ``-S = θ ⊙ Hg``: the
    highest ``θ ⊙ Hg`` are kept. Note the signed score: unlike SNIP it can be negative.

    ``g`` is the gradient of the loss summed over ``batches`` (the prunable weights only, as
    in the paper) and ``Hg`` the Hessian-gradient product of the same loss, by double backward
    (Pearlmutter's trick: ``Hg = ∇_θ (g_fixedᵀ ∇_θ L)``), batch by batch so memory stays that
    of one batch. The logits are divided by ``temperature`` = 200 before the loss, as in the
    authors' released code, which produced the published GraSP numbers (the paper's text does
    not discuss it; it flattens the softmax and so changes which weights rank high). Pass
    ``temperature=1`` for the plain loss. Dropout draws the same masks in both passes (the RNG
    is reset between them).
    """
    if not temperature > 0:
        raise ConfigError(f"grasp temperature must be positive, got {temperature!r}")
    model = unwrap_model(model)
    batches = _batches(batches, "grasp")

    def loss_of(leaves, x, y):
        logits = logits_of(_forward(model, {**_buffer_copies(model), **leaves}, x))
        return task_loss(model, logits / temperature, y, x, loss_fn)

    # double backward: PyTorch's fused attention kernels have no second derivative, the math
    # kernel does (same result up to rounding)
    with _scoring(model, eval_mode=False), sdpa_kernel([SDPBackend.MATH]):
        leaves = _leaves(weights)
        g = {n: torch.zeros_like(t) for n, t in leaves.items()}
        with _fork_rng(model):
            for x, y in batches:  # pass 1: g, no graph kept
                for n, gi in _grads(loss_of(leaves, x, y), leaves).items():
                    g[n] += gi
        hg = {n: torch.zeros_like(t) for n, t in leaves.items()}
        for x, y in batches:  # pass 2: Hg = d/dθ (g · ∇L_b), summed over batches
            grads = _grads(loss_of(leaves, x, y), leaves, create_graph=True)
            z = sum((grads[n] * g[n]).sum() for n in leaves)
            if isinstance(z, torch.Tensor) and z.requires_grad:
                for n, h in _grads(z, leaves).items():
                    hg[n] += h
    return {n: weights[n].detach() * hg[n] for n in weights}


def synflow(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float64,
    tokens: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Synaptic saliency ``|θ ⊙ dR/dθ|`` with the data-free objective
    ``R_SF = 1ᵀ (Π_l |θ^[l]|) 1`` (Tanaka et al. 2020, SynFlow, Algorithm 1).

    The network is linearised: every floating parameter and buffer is replaced by its absolute
    value (the authors' code does this for the whole state, biases and batch-norm statistics
    included), the input is all ones of shape ``(1, *input_shape)`` and ``R = 1ᵀ f(1; |θ|)``
    is the sum of the output. ``R`` is a path norm, and the scores obey the paper's
    conservation laws (in a bias-free positive network every layer's scores sum to ``R``), so
    small layers get large per-weight scores; re-scoring the masked network after each small
    prune is what avoids layer collapse (the iteration lives in
    :class:`secateurs.methods.SynFlow`).

    Batch norm must use its running statistics: with train-mode batch statistics on a single
    all-ones input the per-channel variance is zero and the score depends on the mode, not the
    weights. So the model is switched to eval mode for scoring and every module's mode is
    restored after. The computation runs in ``float64`` (``dtype``): ``R`` is a product of
    absolute values over the depth and can exceed float32's range (~3.4e38) on deep networks.
    The scores are returned in ``dtype``, unnormalised; rescale them
    (e.g. by a power of two) before any float32 step. The live model is never modified: the
    linearised values are handed to :func:`torch.func.functional_call`.

    **Token models.** All-ones is not a sequence of token ids. For a model with token
    embeddings (``tokens=None`` detects an ``nn.Embedding``; force it with ``tokens=True`` /
    ``False``) the all-ones input is defined in embedding space: every embedding table is
    replaced by ones, so each position's input vector is all ones, and the model is fed token
    0 at ``input_shape = (sequence_length,)`` positions. The output is reduced through
    :func:`~secateurs.outputs.logits_of`, so a Hugging Face ``ModelOutput`` works as it is.
    """
    model = unwrap_model(model)
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(
            f"synflow input_shape must be the model's input shape without the batch dimension, "
            f"e.g. (1, 28, 28); got {tuple(input_shape)!r}"
        )
    device = next(iter(weights.values())).device
    embeddings = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    if tokens is None:
        tokens = bool(embeddings)
    with _scoring(model, eval_mode=True):
        tensors = _buffer_copies(model, lambda b: b.detach().abs().to(dtype))
        tensors.update(
            {n: p.detach().abs().to(dtype) for n, p in model.named_parameters() if p.is_floating_point()}
        )
        if tokens:
            tensors.update({n: torch.ones_like(tensors[n]) for n in embeddings if n in tensors})
        leaves = {n: w.detach().abs().to(dtype).requires_grad_(True) for n, w in weights.items()}
        tensors.update(leaves)
        if tokens:
            x = torch.zeros((1, *shape), dtype=torch.long, device=device)
        else:
            x = torch.ones((1, *shape), dtype=dtype, device=device)
        try:
            output = _forward(model, tensors, x)
        except SecateursError:
            raise
        except Exception as err:
            raise ConfigError(
                f"synflow input_shape={shape} does not fit {type(model).__name__}: its all-ones input of shape "
                f"{tuple(x.shape)} (a batch of one) failed in the model. Pass input_shape as the shape of one "
                f"input without the batch dimension, e.g. (1, 28, 28) for MNIST images, (3, 32, 32) for CIFAR, "
                f"(sequence_length,) for a token model. The model raised {model_failure(err)}"
            ) from None
        r = logits_of(output).sum()
        if not torch.isfinite(r):
            raise ConfigError(
                f"synflow's path norm R overflowed {dtype} ({r.item()}); the network is too deep "
                "or its weights too large for this dtype"
            )
        grads = _grads(r, leaves)
    return {n: (leaves[n].detach() * grads[n]).abs() for n in weights}


# -- activity: how much each connection is used on data ---------------------------------------


def _owning_modules(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The module holding each weight (matched by identity, so tied names resolve too)."""
    wanted = {id(w): n for n, w in weights.items()}
    found: dict[str, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            name = wanted.get(id(p))
            if name is not None and name not in found:
                found[name] = module
    missing = [n for n in weights if n not in found]
    if missing:
        raise ConfigError(f"activity: {', '.join(missing[:4])} are not parameters of {type(model).__name__}; "
                          "pass the model's own (prunable) weights, e.g. sparsifier.masks.weights()")
    return found


def _conv2d_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``|x|`` unfolded into the conv's patches and averaged over batch and positions:
    ``[in_channels * kh * kw]``, the mean input each kernel position sees (padding included,
    in the conv's own padding mode)."""
    kh, kw = module.kernel_size
    if isinstance(module.padding, str):  # 'valid' or 'same' (stride 1): split as PyTorch does
        pads = [0, 0, 0, 0]
        if module.padding == "same":
            for i, (k, d) in enumerate(zip(module.kernel_size, module.dilation)):
                total = d * (k - 1)
                pads[2 * (1 - i)], pads[2 * (1 - i) + 1] = total // 2, total - total // 2
    else:
        ph, pw = module.padding
        pads = [pw, pw, ph, ph]
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = torch.nn.functional.pad(x, pads, mode=mode)
    cols = torch.nn.functional.unfold(x.abs(), (kh, kw), dilation=module.dilation, stride=module.stride)
    return cols.mean(dim=(0, 2))


def activity(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    batches: Iterable,
) -> dict[str, torch.Tensor]:
    """Connection activity ``E_x |w_ji x_i|``: the mean absolute contribution of each
    connection to its output unit's input on ``batches``, which equals ``|w_ji| E_x |x_i|``.

    The importance of a synapse in activity-dependent ("use it or lose it") pruning: Zhao &
    Zeng (2021, "Dynamically Optimizing Network Structure Based on Synaptic Pruning in the
    Brain", Front. Syst. Neurosci. 15:620558) prune connections that are "not activated or less
    activated" on the data. A connection whose input is always zero (an MNIST border pixel, a
    dead ReLU unit) scores 0 whatever its weight, so it differs from magnitude exactly where
    the data never use a weight. (The paper's exact activity formula is not reproduced here:
    this is the library's formulation of "how much a connection is activated".)

    Linear layers (and any registered matrix layer, e.g. ``transformers``' ``Conv1D``, whose
    input axis is found through the layer registry) average ``|x|`` over every leading
    dimension; ``nn.Conv2d`` over the batch and the output positions of the unfolded input
    (so each kernel position gets the mean input it sees; grouped convs use their group's
    channels). Other layers are refused by name. Inputs are read by forward pre-hooks that
    exist only during this call, and the model runs on copies of its buffers without grad:
    nothing in the live model changes (batch-norm statistics included), and training runs no
    hook. The scores are those of the network as it is now (pruned weights give 0).
    """
    from .layers import layer_type

    model = unwrap_model(model)
    batches = _batches(batches, "activity")
    modules = _owning_modules(model, weights)
    for name, module in modules.items():
        w = weights[name]
        if not (isinstance(module, nn.Conv2d) or (w.dim() == 2 and layer_type(module) is not None)):
            raise ConfigError(
                f"activity: {name} belongs to a {type(module).__name__}, which this score does not handle (it reads the "
                "inputs of matrix layers such as nn.Linear and of nn.Conv2d); leave it out with exclude=[...]"
            )
    sums: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {n: 0 for n in modules}

    def hook_for(name: str, module: nn.Module):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else next(iter((kwargs or {}).values()))
            x = x.detach().float()
            if isinstance(mod, nn.Conv2d):
                mean = _conv2d_patches(mod, x if x.dim() == 4 else x.unsqueeze(0))
            else:
                mean = x.abs().reshape(-1, x.shape[-1]).mean(dim=0)
            sums[name] = sums.get(name, 0) + mean
            seen[name] += 1
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in modules.items()]
    try:
        with _scoring(model, eval_mode=False), torch.no_grad():
            for x, _ in batches:
                _forward(model, _buffer_copies(model), x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, module in modules.items():
        w = weights[name].detach()
        if seen[name] == 0:
            raise ConfigError(f"activity: {name} was never called on the batches, so its inputs are unknown; "
                              "prune only layers the forward pass uses (exclude=[...] the others)")
        mean = (sums[name] / seen[name]).to(w.device)
        if isinstance(module, nn.Conv2d):
            per_group = w.shape[0] // module.groups
            mean = mean.reshape(module.groups, w.shape[1], *w.shape[2:]).repeat_interleave(per_group, dim=0)
            out[name] = w.abs().float() * mean
        else:
            axis = layer_type(module).output_axis
            out[name] = w.abs().float() * (mean[None, :] if axis == 0 else mean[:, None])
    return out
