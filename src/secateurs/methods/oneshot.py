"""One-shot pruning of trained models from a little calibration data: magnitude, Wanda and
SparseGPT, unstructured or N:M, one transformer block at a time.

| method | score / update | compared within |
|---|---|---|
| ``magnitude`` | ``|W|`` | each output row (or the whole tensor) |
| ``wanda`` | ``|W_ij| * ||X_j||_2`` over the calibration tokens (Sun et al. 2024, Eq. 1) | each output row |
| ``ria`` | ``(|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2^a``, ``a`` = 0.5 (relative importance and activations, Zhang et al. 2024, Eq. 3) | the whole tensor |
| ``sparsegpt`` | OBS reconstruction: columns pruned left to right by ``w^2 / [H^-1]_jj^2``, the rest updated by ``-(w_j / [H^-1]_jj) H^-1_j,:`` (Frantar & Alistarh 2023, Alg. 1) | blocks of ``blocksize`` columns |

Both data-driven methods need statistics of each layer's inputs, ``X`` (tokens x inputs):
Wanda the per-input norms ``||X_j||``, SparseGPT the Hessian ``H = 2 X^T X / n``. The
sequencer (:func:`prune_oneshot`) collects them once per block with temporary forward hooks,
from the calibration activations the already-pruned blocks before it produced, so every
block sees the inputs it will see at inference (as both papers' reference code does). Only
the current block needs to sit on ``device``; activations live in one buffer of
``samples x tokens x hidden`` on the CPU. After each block the pruned weights are written to
``state_path`` (atomically), and a killed run resumes at the next unfinished block.

Magnitude, Wanda and RIA are scores: each is one function of a :class:`ScoreContext` (the
weight, its layout and the statistics the sequencer collected), registered in
:data:`ONESHOT_SCORES`, ranked by the engine's :func:`~secateurs.engine.select` within the
groups asked for. SparseGPT is not a score but a reconstruction (it changes the weights).

We read the authors' reference code (``locuslab/wanda``, MIT; ``IST-DASLab/sparsegpt``,
Apache-2.0; ``biomedical-cybernetics/Relative-importance-and-activation-pruning``) to match
their algorithms; the implementation here is our own, over this
library's layer registry (``nn.Linear``, transformers' ``Conv1D``, any registered type).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..allocation import check_sparsity, keep_count
from ..engine import select
from ..errors import CheckpointError, ConfigError, SparsityMismatchError
from ..granularity import check_nm_config, nm_mask
from ..layers import as_rows, fan_in, from_rows, layer_type, notice, unregistered_matrix_modules
from ..masks import unwrap_model
from ..outputs import call_model, logits_of
from ..registry import Registry
from ..selection import topk_mask
from ..validate import check_int, check_number

__all__ = [
    "METHODS_ONESHOT", "ONESHOT_SCORES", "ScoreContext", "LayerStats", "wanda_scores", "ria_scores",
    "sparsegpt_prune_", "find_blocks", "prune_oneshot", "calibration_samples", "perplexity",
]


# -- per-layer input statistics ---------------------------------------------------------------
class LayerStats:
    """Running statistics of one layer's inputs over calibration tokens: the squared norm of
    every input feature (Wanda) and, if asked, ``H = 2 X^T X / n`` (SparseGPT), in ``dtype``
    (float64 by default; float32 halves the Hessians' memory, as the reference code does)."""

    def __init__(self, features: int, hessian: bool, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64, name: str = "layer"):
        self.tokens, self.name, self.features = 0, name, features
        self.sq = torch.zeros(features, dtype=dtype, device=device)
        self.xtx = torch.zeros(features, features, dtype=dtype, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.features:
            raise ConfigError(
                f"{self.name} has {self.features} input features but its input's last axis has {x.shape[-1]}; "
                "its inputs do not carry their features last, so they cannot be scored from input statistics"
            )
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sq.dtype)
        self.tokens += x.shape[0]
        self.sq += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx += x.T @ x

    @property
    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()

    @property
    def hessian(self) -> torch.Tensor:
        if self.xtx is None or self.tokens == 0:
            raise ConfigError(f"no Hessian was collected for {self.name} (it saw no calibration tokens)")
        return 2.0 * self.xtx / self.tokens


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor, output_axis: int = 0) -> torch.Tensor:
    """``|W_ij| * ||X_j||``: a weight matters as much as its magnitude times the size of the
    input it multiplies (Sun et al. 2024). Shaped like ``weight``."""
    rows = as_rows(weight.detach().abs().double(), output_axis)
    if rows.shape[1] != norms.numel():
        raise ConfigError(f"input norms have {norms.numel()} features but the weight has {rows.shape[1]} inputs")
    return from_rows(rows * norms.to(rows.device)[None, :], weight.shape, output_axis)


def ria_scores(weight: torch.Tensor, norms: torch.Tensor, output_axis: int = 0, power: float = 0.5) -> torch.Tensor:
    """Relative importance and activations (Zhang et al. 2024): a weight's share of its
    output row's plus of its input column's total magnitude, times the input's norm to the
    ``power``. Rows or columns that are all zero score 0. Shaped like ``weight``."""
    rows = as_rows(weight.detach().abs().double(), output_axis)
    if rows.shape[1] != norms.numel():
        raise ConfigError(f"input norms have {norms.numel()} features but the weight has {rows.shape[1]} inputs")
    tiny = torch.finfo(rows.dtype).tiny
    relative = rows / rows.sum(1, keepdim=True).clamp_min(tiny) + rows / rows.sum(0, keepdim=True).clamp_min(tiny)
    return from_rows(relative * norms.to(rows.device)[None, :] ** power, weight.shape, output_axis)


@dataclass(frozen=True)
class ScoreContext:
    """What a one-shot score sees of one layer: its weight and layout, and the statistics of
    its calibration inputs the sequencer collected once (None for data-free scores)."""

    weight: torch.Tensor
    output_axis: int
    stats: LayerStats | None
    name: str


#: One-shot scores: ``fn(ctx: ScoreContext) -> scores`` shaped like the weight, higher = keep.
#: ``fn.needs`` names the statistics it reads ("norms" or None); ``fn.group`` is where the
#: method's paper compares weights ("row" or "tensor"), the default of ``prune_oneshot``.
ONESHOT_SCORES: Registry[Callable[[ScoreContext], torch.Tensor]] = Registry("one-shot score")


def _score(name: str, needs: str | None, group: str, description: str):
    def register(fn):
        fn.needs, fn.group = needs, group
        return ONESHOT_SCORES.register(name, description)(fn)
    return register


@_score("magnitude", None, "row", "|W|, no data")
def _magnitude(ctx: ScoreContext) -> torch.Tensor:
    return ctx.weight.detach().abs()


@_score("wanda", "norms", "row", "|W| times the input norm (Sun et al. 2024)")
def _wanda(ctx: ScoreContext) -> torch.Tensor:
    return wanda_scores(ctx.weight, ctx.stats.norms, ctx.output_axis)


@_score("ria", "norms", "tensor", "relative importance times the input norm^0.5 (Zhang et al. 2024)")
def _ria(ctx: ScoreContext) -> torch.Tensor:
    return ria_scores(ctx.weight, ctx.stats.norms, ctx.output_axis)


#: Every one-shot method: the registered scores, and SparseGPT's reconstruction.
METHODS_ONESHOT = (*ONESHOT_SCORES.names(), "sparsegpt")


#: Precision of the calibration statistics and of SparseGPT's solve.
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


def default_group(method: str) -> str:
    """Where ``method`` compares weights by default: its paper's choice."""
    return "tensor" if method == "sparsegpt" else ONESHOT_SCORES.get(method).group


# -- SparseGPT --------------------------------------------------------------------------------
def _inverse_hessian_factor(h: torch.Tensor, dampening: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` (the rows of ``H_F^-1`` for every
    suffix F of the columns, Frantar & Alistarh 2023, §3.3), with ``damp`` = ``dampening``
    times the mean diagonal. A failure names the layer and asks for more dampening."""
    damp = dampening * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        lower = torch.linalg.cholesky(h + damp * eye)
        inverse = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as err:
        raise ConfigError(
            f"{name}: the calibration Hessian is not positive definite even with dampening {dampening:g} "
            f"({err}); raise dampening (e.g. {min(1.0, dampening * 10):g}) or give more calibration tokens"
        ) from None


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    output_axis: int = 0,
    name: str = "weight",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Prune ``weight`` in place by SparseGPT and return its mask (True = kept).

    Columns (inputs) are processed left to right in blocks of ``blocksize``. Within a block
    the mask is chosen by ``w^2 / [H^-1]_jj^2`` (exactly the planned count per block, ties to
    the lowest index; or n of every m inputs per row for N:M), and each column's error is
    spread over the columns to its right through the inverse Hessian's Cholesky factor; the
    block's accumulated error updates the later blocks at once (the lazy batch update).
    Inputs that never fired (zero Hessian diagonal) get weight 0 and count as pruned first.
    ``dtype`` is the precision of the solve: float64 (default) or float32 (the reference
    code's; half the memory, faster, and the same counts).
    """
    check_sparsity(sparsity)
    rows_view = as_rows(weight, output_axis)
    w = rows_view.detach().to(dtype, copy=True)
    n_rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ConfigError(f"{name}: Hessian of shape {tuple(hessian.shape)} for a layer with {cols} inputs")
    if nm is not None:
        n, m = check_nm_config(*nm)
        if cols % m:
            raise ConfigError(f"{name} has {cols} inputs per output, not a multiple of m={m}; leave it dense")
        if blocksize % m:
            raise ConfigError(f"blocksize {blocksize} must be a multiple of m={m}")
    h = hessian.to(dtype, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_factor(h, dampening, name)
    mask = torch.zeros_like(w, dtype=torch.bool)
    total_pruned = n_rows * cols - keep_count(n_rows * cols, sparsity)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if nm is None:
            # exact counts: the pruned total up to column i is round(total * i / cols)
            n_prune = round(total_pruned * i2 / cols) - round(total_pruned * i1 / cols)
            saliency = (w1 ** 2) / (d[None, :] ** 2)
            saliency[:, dead[i1:i2]] = -1.0  # dead inputs go first
            keep1 = topk_mask(saliency, saliency.numel() - n_prune)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                part = (w1[:, i:i + nm[1]] ** 2) / (d[i:i + nm[1]][None, :] ** 2)
                keep1[:, i:i + nm[1]] = nm_mask(part, *nm, name=name)  # ties to the lowest index, as everywhere
            col = w1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            q1[:, i] = q
            e = (col - q) / d[i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    new = from_rows(w.to(weight.dtype), weight.shape, output_axis)
    weight.copy_(new)
    return from_rows(mask, weight.shape, output_axis)


# -- the sequencer -------------------------------------------------------------------------------
def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: ``blocks`` (a module path such as
    ``"model.layers"``), or the longest ``nn.ModuleList`` of one class whose members hold
    prunable layers (Llama's ``model.layers``, GPT-2's ``transformer.h``, BERT's
    ``encoder.layer``, ViT's ``layers``)."""
    model = unwrap_model(model)
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise ConfigError(f"the model has no module {blocks!r}; name its list of blocks, e.g. 'model.layers'") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or not len(found):
            raise ConfigError(f"{blocks!r} is a {type(found).__name__}, not a non-empty ModuleList of blocks")
        return blocks, found
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1:
            if any(layer_type(m) is not None for m in module[0].modules()):
                found.append((name, module))
    # a stack nested in another (Swin's stages holding blocks) is part of the outer one
    outer = [(n, m) for n, m in found if not any(n != o and n.startswith(f"{o}.") for o, _ in found)]
    if not outer:
        raise ConfigError(
            f"{type(model).__name__} has no stack of repeated blocks the sequencer understands (it looks for an "
            "nn.ModuleList of one block class holding Linear / Conv1D layers); name it with blocks='path.to.list'"
        )
    if len(outer) > 1:
        names = ", ".join(repr(n) for n, _ in outer)
        raise ConfigError(
            f"{type(model).__name__} has {len(outer)} separate stacks of blocks ({names}), e.g. an encoder and a "
            "decoder; the sequencer prunes one stack per pass, so name it with blocks=... (and run once per stack)"
        )
    return outer[0]


class _Stop(BaseException):  # not an Exception: a model's own `except Exception` must not swallow it
    pass


@dataclass
class _BlockInputs:
    """What the sequencer feeds the blocks: the first block's hidden state per sample, and
    for every block and sample the other arguments the model passes it (attention masks,
    rotary embeddings, ...: they may differ per block, e.g. sliding-window layers)."""

    hidden: list[torch.Tensor]
    args: list[list[tuple]]  # [block][sample]: positional arguments after the hidden state
    kwargs: list[list[dict]]  # [block][sample]


def _block_inputs(model: nn.Module, stack: nn.ModuleList, samples: Sequence[Any]) -> _BlockInputs:
    """One dense forward per sample with a pre-hook on every block recording its arguments;
    the forward stops at the last block (nothing after it runs)."""
    seen = _BlockInputs([], [[] for _ in stack], [[] for _ in stack])
    last = len(stack) - 1

    def hook_for(b: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            if not args and isinstance(kwargs.get("hidden_states"), torch.Tensor):
                args = (kwargs.pop("hidden_states"),)  # passed by keyword: make it the first argument
            if not args or not isinstance(args[0], torch.Tensor):
                raise ConfigError(
                    f"block {b} ({type(module).__name__}) was called without a hidden-state tensor as its first "
                    "argument or as hidden_states=; the sequencer cannot feed it"
                )
            if b == 0:
                seen.hidden.append(args[0].detach())
            seen.args[b].append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:]))
            seen.kwargs[b].append({k: None if type(v).__name__.endswith("Cache") else v for k, v in kwargs.items()})
            if b == last:
                raise _Stop
        return hook

    handles = [block.register_forward_pre_hook(hook_for(b), with_kwargs=True) for b, block in enumerate(stack)]
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached is not None:
        config.use_cache = False  # a KV cache would make every later call of a block attend to earlier ones
    try:
        for sample in samples:
            try:
                call_model(model, sample)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
        if cached is not None:
            config.use_cache = cached
    for b, calls in enumerate(seen.args):
        if len(calls) != len(samples):
            raise ConfigError(
                f"block {b} was called {len(calls)} times for {len(samples)} calibration samples (a block that is "
                "skipped or called twice, e.g. layer drop or shared blocks); the sequencer needs every block once "
                "per sample: check `blocks` and put the model in eval mode"
            )
    return seen


def _output_hidden(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"a block returned {type(out).__name__}; expected a tensor or a tuple starting with one")


def _layers_of(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if layer_type(m) is not None}


def _fingerprint(samples: Sequence[Any]) -> str:
    """A short hash of the calibration samples, so a resumed run refuses other data."""
    digest = hashlib.sha256()
    for sample in samples:
        items = sample.items() if isinstance(sample, Mapping) else [("", sample)]
        for key, value in sorted(items, key=lambda kv: kv[0]):
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(str((tuple(value.shape), value.dtype)).encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


@dataclass
class OneShotResult:
    masks: dict[str, torch.Tensor]
    blocks: list[str]
    sparsity: float
    seconds_per_block: list[float]
    block_sparsity: list[float] | None = None  # each block's target, under allocation="owl"


def _save_state(path: str, state: dict) -> None:
    from ..train.checkpoint import atomic_torch_save

    atomic_torch_save(path, state)


@torch.no_grad()
def prune_oneshot(
    model: nn.Module,
    samples: Iterable[Any],
    method: str = "wanda",
    sparsity: float | None = None,
    *,
    nm: tuple[int, int] | None = None,
    group: str | None = None,
    blocks: str | None = None,
    device: torch.device | str | None = None,
    dampening: float = 0.01,
    blocksize: int = 128,
    state_path: str | None = None,
    precision: str = "float64",
    allocation: str = "uniform",
    owl_lambda: float = 0.08,
    owl_m: float = 5.0,
    progress: bool = False,
    on_block: Callable[[int], None] | None = None,
) -> OneShotResult:
    """Prune every registered layer inside the model's blocks, one block at a time.

    ``samples`` are calibration inputs (token tensors ``[1, seq]`` or batches, dicts of model
    inputs, ...). Each block's layers are pruned from the statistics of their inputs as the
    pruned blocks before it produce them; the block's outputs then become the next block's
    inputs. ``method``: magnitude, wanda or sparsegpt; ``nm=(2, 4)`` for N:M (layers whose
    fan-in does not split are left dense, as in the training-time N:M method); ``group``:
    "row" or "tensor" (default: the method's paper's choice, :func:`default_group`). Layers outside the blocks
    (embeddings, the output head) are not pruned. ``state_path``: after every block the pruned
    weights and masks so far are saved there atomically; if the file exists, those blocks are
    loaded instead of pruned again and the run resumes at the next one. A resumable run keeps a
    host copy of the pruned layers' weights for that file; without ``state_path`` none is kept.
    ``precision``: "float64" (default) or "float32" for the calibration statistics and
    SparseGPT's solve; float32 halves the Hessians, as the reference code does.
    ``allocation``: "uniform" (every block at ``sparsity``) or "owl" (Yin et al. 2024,
    outlier-weighed layerwise sparsity: blocks with more outliers keep more weights; see
    :func:`owl_block_sparsity`, with ``owl_lambda`` and ``owl_m``).
    """
    if method not in METHODS_ONESHOT:
        raise ConfigError(f"unknown one-shot method {method!r}; known: {', '.join(METHODS_ONESHOT)}")
    if nm is None:
        if sparsity is None:
            raise ConfigError("give the sparsity to prune to (e.g. 0.5), or an N:M pattern with nm=(2, 4)")
        check_sparsity(sparsity)
    else:
        n, m = check_nm_config(*nm)
        if sparsity is not None and abs(sparsity - (1.0 - n / m)) > 1e-9:
            raise ConfigError(
                f"sparsity={sparsity} contradicts nm=({n}, {m}), which prunes exactly {1 - n / m:g}; drop sparsity "
                "or the N:M pattern"
            )
        sparsity = 1.0 - n / m
    if group is None:
        group = default_group(method)
    if method == "sparsegpt" and group != "tensor":
        raise ConfigError(
            f"SparseGPT chooses its mask block by block over whole columns of the weight; group={group!r} is not "
            "supported for it (leave group unset)"
        )
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if group not in ("row", "tensor"):
        raise ConfigError(f"group must be 'row' or 'tensor', got {group!r}")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    if allocation == "owl":
        if nm is not None:
            raise ConfigError(
                "allocation='owl' gives every block its own unstructured sparsity; with nm=(N, M) every block has the "
                "pattern's sparsity, so there is nothing to allocate. Drop one of them (mixed N:M per block is not built)"
            )
        check_number(owl_lambda, "owl_lambda", above=0, below=1, hint="OWL's paper uses 0.02-0.2 (0.08 default)")
        check_number(owl_m, "owl_m", above=0, hint="OWL's paper uses 3-10 (5 default)")
    model = unwrap_model(model)
    samples = list(samples)
    if not samples:
        raise ConfigError("prune_oneshot needs at least one calibration sample")
    odd = next((s for s in samples if not isinstance(s, (torch.Tensor, Mapping))), None)
    if odd is not None:
        raise ConfigError(
            f"a calibration sample is a {type(odd).__name__}; give token tensors ([1, seq]) or mappings of model "
            "inputs such as {'input_ids': x, 'attention_mask': m} (a tuple would be passed as positional arguments)"
        )
    path, stack = find_blocks(model, blocks)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    state = {"format": "secateurs.oneshot/1", "method": method, "sparsity": sparsity, "nm": nm,
             "group": group, "blocks": path, "done": 0, "weights": {}, "masks": {},
             "keep_weights": state_path is not None, "precision": precision, "dampening": dampening,
             "blocksize": blocksize, "samples": _fingerprint(samples),
             "allocation": allocation if allocation == "uniform" else [allocation, owl_lambda, owl_m],
             "block_sparsity": None}
    if state_path is not None and os.path.exists(state_path):
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        keys = ("format", "method", "sparsity", "nm", "group", "blocks", "precision", "dampening", "blocksize",
                "samples", "allocation")
        for k in keys:  # states written before a key was recorded: as the defaults were then
            saved.setdefault(k, {"precision": "float64", "dampening": 0.01, "blocksize": 128,
                                 "allocation": "uniform"}.get(k, state[k]))
        if any(saved.get(k) != state[k] for k in keys):
            raise CheckpointError(
                f"{state_path} is the state of another one-shot run "
                f"({ {k: saved.get(k) for k in keys} }); use a new state path or the same settings"
            )
        state = saved
    modes = {mod: mod.training for mod in model.modules()}
    model.eval()
    times: list[float] = []
    try:
        inputs = _block_inputs(model, stack, samples)
        hidden = [h.to("cpu") for h in inputs.hidden]  # the bounded buffer: one hidden state per sample
        inputs.hidden = []  # the states live only in `hidden`
        if allocation == "owl" and state.get("block_sparsity") is None:  # a resumed run keeps its plan
            lods, sizes = _outlier_ratios(stack, path, [h.clone() for h in hidden], inputs, device, home, owl_m)
            state["block_sparsity"] = owl_block_sparsity(lods, sizes, sparsity, owl_lambda)
        bar = _progress(len(stack), progress)
        for b, block in enumerate(stack):
            t0 = _clock()
            block.to(device)
            prefix = f"{path}.{b}"
            layers = _layers_of(block)
            args, kwargs = inputs.args[b], inputs.kwargs[b]
            if b < state["done"]:
                for name, layer in layers.items():
                    key = f"{prefix}.{name}" if name else prefix
                    if key not in state["weights"]:
                        raise CheckpointError(
                            f"{state_path} has no weights for {key}, which block {b} holds; it was written for another "
                            "model. Use a new state path"
                        )
                    kind = layer_type(layer)
                    getattr(layer, kind.param).copy_(state["weights"][key].to(device))
            else:
                target = sparsity if state.get("block_sparsity") is None else state["block_sparsity"][b]
                _prune_block(block, prefix, layers, hidden, args, kwargs, device, method, target, nm, group,
                             dampening, blocksize, state, PRECISIONS[precision])
                state["done"] = b + 1
                if state_path is not None:
                    _save_state(state_path, state)
                if on_block is not None:
                    on_block(b)
            for i, (a, k) in enumerate(zip(args, kwargs)):  # in place: one buffer, never two
                hidden[i] = _output_hidden(block(hidden[i].to(device), *a, **_to(k, device))).to("cpu")
            block.to(home)
            times.append(_clock() - t0)
            bar.update(1)
        bar.close()
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    masks = {k: v.clone() for k, v in state["masks"].items()}
    total = sum(v.numel() for v in masks.values())
    achieved = 1 - sum(int(v.sum()) for v in masks.values()) / total if total else 0.0
    return OneShotResult(masks, [f"{path}.{i}" for i in range(len(stack))], achieved, times,
                         state.get("block_sparsity"))


#: How the sparsity is shared among blocks: every block the same, or OWL's outlier-weighed split.
ALLOCATIONS = ("uniform", "owl")


def owl_block_sparsity(outlier_ratios: Sequence[float], sizes: Sequence[int], sparsity: float,
                       lam: float) -> list[float]:
    """OWL's per-block sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity", ICML 2024):
    the blocks' outlier ratios D_l are mapped linearly onto densities spanning ``2 * lam``
    (``(D_l - min D) / (max D - min D) * 2 lam``), then shifted so the mean density is
    ``1 - sparsity``; a block's sparsity is one minus its density. The paper's code takes the
    plain mean over blocks; here the mean is weighted by each block's prunable weights
    (``sizes``), which is the same for the equal blocks of a transformer stack and keeps the
    model's overall sparsity at the target when blocks differ. Equal ratios give every block
    ``sparsity``. A ``lam`` that would push a block outside [0, 1) is refused."""
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = d.max() - d.min()
    density = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    density = density - (density * w).sum() / w.sum() + (1 - sparsity)
    out = (1 - density).tolist()
    bad = [(i, v) for i, v in enumerate(out) if not 0 <= v < 1]
    if bad:
        i, v = bad[0]
        raise ConfigError(
            f"OWL with owl_lambda={lam} at sparsity {sparsity} gives block {i} the sparsity {v:.4f}, outside [0, 1); "
            f"lower owl_lambda (below {min(sparsity, 1 - sparsity) / 2:g} always fits)"
        )
    return out


def _outlier_ratios(stack, path, hidden, inputs, device, home, m: float) -> tuple[list[float], list[int]]:
    """Each block's outlier ratio on the dense model: the share of its registered layers'
    Wanda scores |W| * ||X|| above ``m`` times their mean (OWL's "layerwise outlier
    distribution"), with the inputs the dense blocks before it produce; and each block's
    number of prunable weights."""
    ratios, sizes = [], []
    for b, block in enumerate(stack):
        block.to(device)
        layers = _layers_of(block)
        args, kwargs = inputs.args[b], inputs.kwargs[b]
        stats, handles = {}, []
        for name, layer in layers.items():
            kind = layer_type(layer)
            w = getattr(layer, kind.param)
            if w.dim() != 2:
                raise ConfigError(f"{path}.{b}.{name} has a {w.dim()}-D weight; OWL scores matrix layers (Linear, "
                                  "Conv1D) only. Use allocation='uniform' for this model")
            stats[name] = LayerStats(fan_in(w.shape, kind.output_axis), hessian=False, device=device,
                                     name=f"{path}.{b}.{name}")
            handles.append(layer.register_forward_hook(lambda mod, inp, out, s=stats[name]: s.add(inp[0])))
        try:
            for i, (a, k) in enumerate(zip(args, kwargs)):
                hidden[i] = _output_hidden(block(hidden[i].to(device), *a, **_to(k, device))).to("cpu")
        finally:
            for handle in handles:
                handle.remove()
        scores = []
        for name, layer in layers.items():
            kind = layer_type(layer)
            scores.append(wanda_scores(getattr(layer, kind.param), stats[name].norms, kind.output_axis).flatten())
        flat = torch.cat(scores).double()
        ratios.append(float((flat > m * flat.mean()).double().mean()))
        sizes.append(flat.numel())
        block.to(home)
    return ratios, sizes


def _prune_block(block, prefix, layers, hidden, args, kwargs, device, method, sparsity, nm, group,
                 dampening, blocksize, state, dtype) -> None:
    stats: dict[str, LayerStats] = {}
    handles = []
    score = ONESHOT_SCORES.get(method) if method != "sparsegpt" else None
    unseen = unregistered_matrix_modules(block)
    if unseen:
        notice(f"{prefix} holds matrix weights of types the layer registry does not know, left dense: "
               + ", ".join(f"{n} ({t})" for n, t in unseen[:4]) + "; secateurs.register_layer(...) makes them prunable")
    if score is None or score.needs is not None:
        for name, layer in layers.items():
            kind = layer_type(layer)
            w = getattr(layer, kind.param)
            if w.dim() != 2:  # the statistics read the inputs' last axis as the weight's input features
                raise ConfigError(
                    f"{prefix}.{name} is a {type(layer).__name__} with a {w.dim()}-D weight; {method} needs the input "
                    "statistics of matrix layers (Linear, Conv1D) whose inputs carry their features last. Use "
                    "method='magnitude' for this model, or name blocks without such layers"
                )
            stats[name] = LayerStats(fan_in(w.shape, kind.output_axis), hessian=method == "sparsegpt", device=device,
                                     dtype=dtype, name=f"{prefix}.{name}")
            handles.append(layer.register_forward_hook(
                lambda mod, inp, out, s=stats[name]: s.add(inp[0])))
        try:
            for h, a, k in zip(hidden, args, kwargs):
                block(h.to(device), *a, **_to(k, device))
        finally:
            for handle in handles:
                handle.remove()
        silent = [f"{prefix}.{n}" for n, s in stats.items() if s.tokens == 0]
        if silent:
            raise ConfigError(
                f"{', '.join(silent[:4])} saw no calibration tokens: the block's forward never calls "
                f"{'them' if len(silent) > 1 else 'it'} as a module (e.g. a weight used through F.linear, like "
                f"nn.MultiheadAttention's out_proj), so {method} has no statistics to score with. Use "
                "method='magnitude' for this model, or wrap those weights in modules the forward calls"
            )
    misfits = []
    for name, layer in layers.items():
        kind = layer_type(layer)
        w = getattr(layer, kind.param)
        key = f"{prefix}.{name}" if name else prefix
        fan = fan_in(w.shape, kind.output_axis)
        if nm is not None and fan % nm[1]:
            mask = torch.ones_like(w, dtype=torch.bool)  # stays dense, like the N:M method
            misfits.append(f"{key} ({fan} inputs)")
        elif method == "sparsegpt":
            mask = sparsegpt_prune_(w, stats[name].hessian, sparsity, nm, blocksize, dampening, kind.output_axis, key,
                                    dtype=dtype)
        else:
            scores = score(ScoreContext(w, kind.output_axis, stats.get(name), key))
            mask = select(scores, sparsity, nm if nm is not None else group, kind.output_axis, key)
            w.mul_(mask.to(w.dtype))
        _check_count(key, mask, sparsity, nm, group if method != "sparsegpt" else "tensor", kind.output_axis, fan)
        state["masks"][key] = mask.to("cpu")
        if state.get("keep_weights", True):  # only a resumable run needs a copy of the pruned weights
            state["weights"][key] = w.detach().to("cpu").clone()
    if misfits:
        notice(f"{nm[0]}:{nm[1]} left {len(misfits)} layer(s) of {prefix} dense (inputs per output not divisible by "
               f"{nm[1]}): {', '.join(misfits[:4])}")


def _check_count(key, mask, sparsity, nm, group, output_axis, fan) -> None:
    """Every mask holds exactly the planned number of weights, or the run stops."""
    rows = mask.numel() // fan
    if nm is not None and fan % nm[1]:
        planned = mask.numel()
    elif nm is not None:
        planned = mask.numel() // nm[1] * nm[0]
    elif group == "row":
        planned = rows * keep_count(fan, sparsity)
    else:
        planned = keep_count(mask.numel(), sparsity)
    kept = int(torch.count_nonzero(mask))
    if kept != planned:
        raise SparsityMismatchError(
            f"{key} keeps {kept} weights but the plan keeps {planned} (this is a bug; please report it)"
        )


def _to(kwargs: dict, device) -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t.to(device) for t in v)
        else:
            out[k] = v
    return out


def _clock() -> float:
    import time

    return time.perf_counter()


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, on: bool):
    if not on:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="blocks", unit="block")


def calibration_samples(tokens: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """``n`` windows of ``seq_len`` tokens drawn uniformly from a 1-D token stream (the
    papers' C4 / WikiText calibration recipe), as ``{"input_ids": [1, seq_len]}`` samples."""
    tokens = tokens.reshape(-1)
    check_int(n, "the number of calibration samples", minimum=1)
    if tokens.numel() <= seq_len:
        raise ConfigError(
            f"the calibration text has {tokens.numel()} tokens, not more than one sequence of {seq_len}; "
            "give more text or a shorter sequence length"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n,), generator=g).tolist()
    return [{"input_ids": tokens[s:s + seq_len][None].clone()} for s in starts]


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 8) -> float:
    """exp of the mean next-token cross-entropy over ``tokens`` (1-D) cut into
    non-overlapping windows of ``seq_len`` (the remainder is dropped), as the Wanda and
    SparseGPT papers evaluate WikiText-2."""
    tokens = tokens.reshape(-1)
    windows = tokens.numel() // seq_len
    if windows == 0:
        raise ConfigError(f"{tokens.numel()} tokens are fewer than one window of {seq_len}")
    data = tokens[: windows * seq_len].reshape(windows, seq_len)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    total, count = 0.0, 0
    try:
        device = next(model.parameters()).device
        for i in range(0, windows, batch_size):
            x = data[i:i + batch_size].to(device)
            logits = logits_of(model(input_ids=x)).double()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += x[:, 1:].numel()
    finally:
        for m, mode in modes.items():
            m.training = mode
    return math.exp(total / count)
