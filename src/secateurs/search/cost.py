"""What a candidate costs on the machine the search runs on: latency, peak memory, MACs.

A search under a device budget (:class:`Budget`) needs each candidate's cost before training
it. Three costs, all computed from the candidate's shapes (:func:`.space.layer_shapes`):

* **MACs** (:func:`macs`): multiply-accumulates per example of every conv and linear layer,
  counted as :func:`secateurs.analysis.flops.layer_macs` counts them (output elements x the
  weight's fan-in; a depthwise conv's fan-in is its kernel area). Bias adds, batch norm,
  activations and pooling are not counted.
* **Peak memory** (:func:`peak_memory`): bytes at inference, weights + buffers + the largest
  set of activations alive at once during the forward pass (defined exactly there).
* **Latency** (:class:`LatencyTable`): a table of measured seconds per block and input
  shape (and per classifier head), measured on first use with :func:`measure_latency` and
  cached in a JSON file. A candidate's latency is predicted as the sum of its blocks' and its
  head's entries plus the fixed cost of the model's frame (the outer ``Sequential`` calls and
  the flatten), which is measured once too. The file carries a fingerprint of the machine it
  was measured on (CPU model, logical cores, torch version, threads, batch, float dtype); a
  table from another machine is detected when opened and re-measured or refused.

The prediction is checked against a real timing by ``tests/test_search_cost.py``: on a 4-block
candidate (``conv3-16p.dwsep3-32p.conv3-32.fc-64`` on 28 x 28 images, batch 1, one thread)
the predicted latency is within :data:`PREDICTION_TOLERANCE` (30 %) of the measured median.
On the 2-core machine this was written on, six candidates of 1-4 blocks came out 0-11 %
below their measured latency when the machine was quiet and up to 24 % below with another
process busy: the prediction runs a little low (a block timed alone finds its input and
output buffers hot in cache), and load moves single timings by 10-20 %. The 30 % covers
both; a search compares candidates timed by the same table, so a shared bias cancels.
At larger batches it is worse: at batch 8 the same six ran 1-43 % low, because buffers of
a few hundred KiB (max-pool's output and int64 indices) come from fresh pages or reused ones
depending on what the allocator saw before, so a block's time depends on its neighbours.
The tolerance is stated for batch 1, the batch searches here time.

A :class:`Budget` limits any of the three; :func:`candidate_costs` gives a candidate's costs
in the budget's units and :func:`check_budget_feasible` refuses, before a search starts, a
budget that no candidate of the space meets, saying what the cheapest candidates cost.

Units: latency in seconds from the table and :func:`measure_latency`, milliseconds in
budgets and :func:`candidate_costs` (``latency_ms``); memory in bytes from
:func:`peak_memory`, MiB (2**20 bytes) in budgets (``memory_mb``); MACs per example
everywhere. Latency and memory are for one batch of the table's ``batch`` examples (1 by
default).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..errors import ConfigError
from ..validate import check_bool, check_int, check_number, describe
from .space import CONV_OPS, Architecture, Block, InputShape, SearchSpace, build, layer_shapes

__all__ = [
    "PREDICTION_TOLERANCE", "measure_latency", "macs", "parameters", "peak_memory", "machine_fingerprint",
    "LatencyTable", "Budget", "candidate_costs", "check_budget_feasible", "cheapest",
]

#: Relative error of :meth:`LatencyTable.predict` against a measured timing that the tests
#: accept (see the module docstring).
PREDICTION_TOLERANCE = 0.30

#: A repeat of :func:`measure_latency` times enough calls to last at least this long, so
#: that calls of a few microseconds are not lost in the timer's resolution and jitter.
_MIN_REPEAT_S = 2e-4
_MAX_CALLS_PER_REPEAT = 200

_FORMAT = "secateurs-latency-table"
_VERSION = 1
_MIB = 2 ** 20
_METRICS = ("latency_ms", "memory_mb", "macs")


# ---------------------------------------------------------------------------------------------
# timing


def measure_latency(
    model: nn.Module, example: torch.Tensor, *, repeats: int = 30, warmup: int = 5, threads: int = 1
) -> float:
    """Median seconds of one ``model(example)`` call in eval mode under ``torch.no_grad()``.

    ``warmup`` calls are made first and not timed. Each of the ``repeats`` timings covers as
    many back-to-back calls as make it last at least 0.2 ms (at most 200; one call for
    anything slower) and is divided by their number; the median of the repeats is returned,
    so a few repeats slowed by other processes do not move it. Runs with
    ``torch.set_num_threads(threads)``; the previous thread count and every submodule's
    train / eval mode are restored afterwards."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"measure_latency needs an nn.Module, got {describe(model)}; pass e.g. build(arch, shape)")
    if not isinstance(example, torch.Tensor):
        raise ConfigError(
            f"measure_latency needs the example input as a tensor with the batch on dim 0, got {describe(example)}; "
            "pass e.g. torch.randn(1, 1, 28, 28)"
        )
    check_int(repeats, "measure_latency repeats", minimum=1)
    check_int(warmup, "measure_latency warmup", minimum=0)
    check_int(threads, "measure_latency threads", minimum=1, hint="the intra-op threads torch may use while timing")
    previous = torch.get_num_threads()
    modes = {m: m.training for m in model.modules()}
    try:
        torch.set_num_threads(threads)
        model.eval()
        with torch.no_grad():
            for _ in range(warmup):
                model(example)
            start = time.perf_counter()
            model(example)
            single = time.perf_counter() - start
            calls = max(1, min(_MAX_CALLS_PER_REPEAT, math.ceil(_MIN_REPEAT_S / max(single, 1e-9))))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    model(example)
                times.append((time.perf_counter() - start) / calls)
    finally:
        torch.set_num_threads(previous)
        for module, training in modes.items():
            module.training = training
    return float(statistics.median(times))


# ---------------------------------------------------------------------------------------------
# shapes -> MACs, parameters, memory
#
# One walk over the chain, block by block, serves macs(), parameters(), peak_memory() and the
# search for the cheapest candidates, so they cannot disagree.


@dataclass(frozen=True)
class _Prefix:
    """The costs of a chain's blocks so far, without the head. Activation sizes are per example."""

    blocks: tuple[Block, ...]
    shape: tuple[int, ...]  # what the last block outputs: (C, H, W), or (features,) after an fc block
    is_input: bool  # True while that output is the input image itself (no block yet)
    macs: int = 0
    params: int = 0
    buffer_bytes: int = 0
    peak_elements: int = 0  # the largest set of live activations so far, per example
    latency_s: float = 0.0


def _start(shape: InputShape) -> _Prefix:
    x = shape.channels * shape.size * shape.size
    return _Prefix((), (shape.channels, shape.size, shape.size), True, peak_elements=x)


def _elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _extend(prefix: _Prefix, block: Block, image: InputShape, *, batchnorm: bool,
            latency: Callable[[Block, tuple[int, ...]], float] | None = None) -> _Prefix:
    """``prefix`` with ``block`` appended. The activation bookkeeping follows
    :func:`peak_memory`'s definition: while a layer of block i runs, the input image, block
    i's input, the layer's input and the layer's output are alive (each storage once)."""
    x = _elements((image.channels, image.size, image.size))
    shape = prefix.shape
    if block.conv:
        if len(shape) != 3:
            raise ConfigError(f"{block.label} follows an fc block; conv blocks come first")
        channels, side, _ = shape
        kernel, separable = CONV_OPS[block.op]
        area = side * side
        out_side = side // 2 if block.pool else side
        if block.pool and out_side < 1:
            raise ConfigError(f"{block.label} pools a {side}px feature map to nothing; drop its pool")
        if separable:
            block_macs = channels * area * kernel * kernel + block.width * area * channels
            params = channels * kernel * kernel + block.width * channels
            outputs = [channels * area, block.width * area]  # depthwise, pointwise
        else:
            block_macs = block.width * area * channels * kernel * kernel
            params = block.width * channels * kernel * kernel
            outputs = [block.width * area]
        buffers = 0
        if batchnorm:
            params += 2 * block.width  # weight, bias
            buffers = 2 * block.width * _float_bytes() + 8  # running mean / var, num_batches_tracked (int64)
            outputs.append(block.width * area)
        else:
            params += block.width  # the conv's bias
        outputs.append(None)  # ReLU(inplace=True): no new tensor
        if block.pool:
            outputs.append(block.width * out_side * out_side)
        new_shape: tuple[int, ...] = (block.width, out_side, out_side)
        peak = _block_peak(x, prefix, outputs)
    else:
        features = _elements(shape)  # the flatten is a view of the previous output
        block_macs = features * block.width
        params = features * block.width + block.width
        buffers = 0
        new_shape = (block.width,)
        peak = _block_peak(x, prefix, [block.width, None])
    entry = latency(block, shape) if latency is not None else 0.0
    return _Prefix(
        prefix.blocks + (block,), new_shape, False, prefix.macs + block_macs, prefix.params + params,
        prefix.buffer_bytes + buffers, max(prefix.peak_elements, peak), prefix.latency_s + entry,
    )


def _block_peak(x: int, prefix: _Prefix, outputs: list[int | None]) -> int:
    """Largest live set (elements per example) while a block runs: ``outputs`` are its layers'
    output sizes in order, None for an in-place layer."""
    held = x + (0 if prefix.is_input else _elements(prefix.shape))  # the image, the block's input
    peak, current = 0, None  # current: the running layer's input when it is not the block's input
    for out in outputs:
        live = held + (current or 0)
        if out is not None:
            live += out
            current = out
        peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class _Costs:
    macs: int
    params: int
    buffer_bytes: int
    peak_elements: int
    latency_s: float


def _finish(prefix: _Prefix, image: InputShape, *, head_latency: Callable[[int, int], float] | None = None) -> _Costs:
    """The whole candidate's costs: ``prefix`` plus the classifier head."""
    x = _elements((image.channels, image.size, image.size))
    features = _elements(prefix.shape)
    head_in = 0 if prefix.is_input else features  # the flattened image is a view of the input
    peak = max(prefix.peak_elements, x + head_in + image.classes)
    latency = prefix.latency_s + (head_latency(features, image.classes) if head_latency is not None else 0.0)
    return _Costs(
        prefix.macs + features * image.classes, prefix.params + features * image.classes + image.classes,
        prefix.buffer_bytes, peak, latency,
    )


def _check_arch(arch: Any, shape: Any, where: str) -> None:
    if not isinstance(arch, Architecture):
        raise ConfigError(f"{where} needs an Architecture, got {describe(arch)}; use Architecture.from_dict(...)")
    if not isinstance(shape, InputShape):
        raise ConfigError(f"{where} needs an InputShape, got {describe(shape)}; use e.g. InputShape(1, 28, 10)")
    layer_shapes(arch, shape)  # refuses too many pools


def _walk(arch: Architecture, shape: InputShape, batchnorm: bool) -> _Costs:
    prefix = _start(shape)
    for block in arch.blocks:
        prefix = _extend(prefix, block, shape, batchnorm=batchnorm)
    return _finish(prefix, shape)


def _float_bytes() -> int:
    return torch.empty((), dtype=torch.get_default_dtype()).element_size()


def macs(arch: Architecture, shape: InputShape) -> int:
    """Multiply-accumulates per example of every conv and linear layer of ``build(arch, shape)``,
    as :func:`secateurs.analysis.flops.layer_macs` counts them: output elements x fan-in. A k x k
    conv from C to W channels on an s x s map (padding keeps the size; the pool comes after
    it): ``W s^2 C k^2``; a depthwise-separable one ``C s^2 k^2 + W s^2 C``; a linear layer
    ``in x out``. Biases, batch norm, ReLU and pooling are not counted."""
    _check_arch(arch, shape, "macs")
    return _walk(arch, shape, True).macs


def parameters(arch: Architecture, shape: InputShape, *, batchnorm: bool = True) -> int:
    """The number of parameters of ``build(arch, shape, batchnorm=batchnorm)``, from shapes
    alone: conv weights (a conv has a bias only without batch norm), batch norm's weight and
    bias, linear weights and biases. Buffers (batch norm's running statistics) are not
    parameters; :func:`peak_memory` counts them."""
    _check_arch(arch, shape, "parameters")
    check_bool(batchnorm, "parameters batchnorm")
    return _walk(arch, shape, batchnorm).params


def peak_memory(arch: Architecture, shape: InputShape, *, batch: int = 1, batchnorm: bool = True) -> int:
    """Bytes ``build(arch, shape, batchnorm=batchnorm)`` holds at its peak while it classifies
    a batch of ``batch`` images under ``torch.no_grad()``:

    ``weights + buffers + batch x (largest set of activations alive at once) x bytes per float``

    * weights: every parameter (:func:`parameters`) in the default float dtype; buffers: batch
      norm's running mean and variance (floats) and its ``num_batches_tracked`` (8 bytes);
    * activations alive at once: ``nn.Sequential`` passes each layer's output to the next and
      drops the previous one, so while a layer of block ``i`` runs, these are alive: the input
      image (the caller holds it throughout), block ``i``'s input (held by the outer
      ``Sequential`` until the block returns), the layer's input and the layer's output.
      While the head runs: the image, the head's input and the logits. A tensor is counted
      once when two of these are the same: ReLU runs in place (no new tensor) and the flatten
      is a view. The peak is the largest such set over all layers.

    Not counted: the temporary workspaces inside a kernel (e.g. a convolution's unfolded
    input or max-pool's indices, which depend on the backend), the interpreter, and the
    allocator's slack. ``tests/test_search_cost.py`` checks the activation count against a
    hand computation and against the tensors a real forward pass keeps alive."""
    _check_arch(arch, shape, "peak_memory")
    check_int(batch, "peak_memory batch", minimum=1)
    check_bool(batchnorm, "peak_memory batchnorm")
    return _memory_bytes(_walk(arch, shape, batchnorm), batch)


def _memory_bytes(costs: _Costs | _Prefix, batch: int) -> int:
    size = _float_bytes()
    return costs.params * size + costs.buffer_bytes + batch * costs.peak_elements * size


# ---------------------------------------------------------------------------------------------
# the latency table


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_fingerprint(*, batch: int = 1, threads: int = 1) -> dict:
    """What a latency depends on besides the model: CPU model, architecture, logical cores,
    torch version, the threads and batch it is timed with, the default float dtype."""
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine() or "unknown",
        "logical_cores": os.cpu_count() or 0,
        "torch": torch.__version__,
        "threads": threads,
        "batch": batch,
        "dtype": str(torch.get_default_dtype()).replace("torch.", ""),
    }


def _shape_key(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


class LatencyTable:
    """Measured latencies on this machine, keyed by block and input shape, cached in a file.

    Open with :meth:`open`. Entries (seconds for one batch of ``batch`` examples, with
    ``threads`` intra-op threads, the median of ``repeats`` timings by
    :func:`measure_latency`):

    * ``block|<label>|<bn|nobn>|<input shape>``: one block of :func:`.space.build`'s chain
      (the same module, ``blocks.<i>``), e.g. ``block|conv3-16p|bn|1x28x28``; fc blocks have no
      batch norm and are keyed ``-``;
    * ``head|<in features>|<classes>``: the classifier;
    * ``frame|<image shape>``: the rest of the model's call: the outer ``Sequential`` calls and
      the flatten, measured as the time of ``Sequential(blocks=Sequential(Flatten()),
      head=Identity())`` minus that of ``Identity()`` (so the harness's own cost and one
      module call, already inside the head's entry, are not counted twice; never below 0).

    :meth:`predict` adds a candidate's entries. Each new entry is saved to the file at once
    (atomically) unless :meth:`deferred_saves` groups several. Two processes sharing a file
    may each measure an entry; the last save wins."""

    def __init__(self, path: Path | None, machine: dict, entries: dict[str, float], *,
                 repeats: int, warmup: int, echo: Callable[[str], Any]) -> None:
        self.path = path
        self.machine = machine
        self.entries = entries
        self.batch = int(machine["batch"])
        self.threads = int(machine["threads"])
        self.repeats = repeats
        self.warmup = warmup
        self.echo = echo
        self._hold = 0
        self._dirty = False

    @classmethod
    def open(cls, path: str | Path | None, *, batch: int = 1, threads: int = 1, on_mismatch: str = "remeasure",
             echo: Callable[[str], Any] = print, repeats: int = 30, warmup: int = 5) -> "LatencyTable":
        """The table cached at ``path`` (None: in memory only; a missing file: an empty table,
        written on the first save).

        A file measured on another machine (its fingerprint, :func:`machine_fingerprint`,
        differs from this one's in any field, batch and threads included) is not used: with
        ``on_mismatch="remeasure"`` the table starts empty, ``echo`` says why, and the file is
        overwritten on the next save; with ``"refuse"`` a :class:`ConfigError` names the
        fields that differ. A file that is not a latency table, or that cannot be read, is a
        :class:`ConfigError` naming the path."""
        check_int(batch, "LatencyTable batch", minimum=1, hint="the examples per timed call")
        check_int(threads, "LatencyTable threads", minimum=1, hint="the intra-op threads torch uses while timing")
        check_int(repeats, "LatencyTable repeats", minimum=1)
        check_int(warmup, "LatencyTable warmup", minimum=0)
        if on_mismatch not in ("remeasure", "refuse"):
            raise ConfigError(
                f"LatencyTable on_mismatch must be 'remeasure' or 'refuse', got {describe(on_mismatch)}; "
                "'remeasure' starts an empty table when the file comes from another machine, 'refuse' raises"
            )
        if not callable(echo):
            raise ConfigError(f"LatencyTable echo must be a function taking a message, got {describe(echo)}; e.g. print")
        machine = machine_fingerprint(batch=batch, threads=threads)
        if path is None:
            return cls(None, machine, {}, repeats=repeats, warmup=warmup, echo=echo)
        if not isinstance(path, (str, Path)) or not str(path):
            raise ConfigError(f"LatencyTable path must be a file path or None, got {describe(path)}")
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"latency table {path} is a directory; pass a file path, e.g. {path / 'latency.json'}")
        if not path.exists():
            return cls(path, machine, {}, repeats=repeats, warmup=warmup, echo=echo)
        stored, entries = _read_table(path)
        differ = {k: (stored.get(k), v) for k, v in machine.items() if stored.get(k) != v}
        if differ:
            what = "; ".join(f"{k}: file {a!r}, here {b!r}" for k, (a, b) in differ.items())
            if on_mismatch == "refuse":
                raise ConfigError(
                    f"latency table {path} was measured on another machine or setting ({what}); its latencies "
                    "do not hold here. Open it with on_mismatch='remeasure' to measure again on this machine "
                    "(the file is overwritten), or pass another path"
                )
            echo(f"latency table {path} was measured on another machine or setting ({what}); "
                 "measuring again here, the file is overwritten on the next save")
            entries = {}
        return cls(path, machine, entries, repeats=repeats, warmup=warmup, echo=echo)

    # -- entries ---------------------------------------------------------------------------

    def _example(self, shape: tuple[int, ...]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randn((self.batch, *shape), generator=generator)

    def _measure(self, key: str, make: Callable[[], tuple[nn.Module, torch.Tensor]]) -> float:
        value = self.entries.get(key)
        if value is None:
            module, example = make()
            value = measure_latency(module, example, repeats=self.repeats, warmup=self.warmup, threads=self.threads)
            self.entries[key] = float(value)
            self._dirty = True
            if self._hold == 0:
                self.save()
        return value

    def block_latency(self, block: Block, in_shape: tuple[int, ...], *, batchnorm: bool = True) -> float:
        """Seconds for ``block`` on inputs of ``in_shape`` (a conv block: ``(C, H, W)`` with
        ``H == W``; an fc block: ``(features,)``, or a conv shape, which it flattens),
        measured on first use and cached."""
        if not isinstance(block, Block):
            raise ConfigError(f"block_latency needs a Block, got {describe(block)}; e.g. Block('conv3', 16)")
        check_bool(batchnorm, "block_latency batchnorm")
        shape = _check_in_shape(block, in_shape)
        if block.conv:
            key = f"block|{block.label}|{'bn' if batchnorm else 'nobn'}|{_shape_key(shape)}"
            image = InputShape(shape[0], shape[1], 1)

            def make():
                return build(Architecture((block,)), image, batchnorm=batchnorm).blocks[0], self._example(shape)
        else:
            features = _elements(shape)
            key = f"block|{block.label}|-|{features}"

            def make():
                model = build(Architecture((block,)), InputShape(features, 1, 1))
                return model.blocks[1], self._example((features,))  # blocks[0] is the flatten
        return self._measure(key, make)

    def head_latency(self, in_features: int, classes: int) -> float:
        """Seconds for the classifier (one Linear) from ``in_features`` to ``classes``."""
        check_int(in_features, "head_latency in_features", minimum=1)
        check_int(classes, "head_latency classes", minimum=1)

        def make():
            return nn.Linear(in_features, classes), self._example((in_features,))
        return self._measure(f"head|{in_features}|{classes}", make)

    def frame_latency(self, shape: InputShape) -> float:
        """Seconds the model's frame adds to its blocks and head (see the class docstring)."""
        if not isinstance(shape, InputShape):
            raise ConfigError(f"frame_latency needs an InputShape, got {describe(shape)}")
        key = f"frame|{_shape_key((shape.channels, shape.size, shape.size))}"
        value = self.entries.get(key)
        if value is None:
            example = self._example((shape.channels, shape.size, shape.size))
            frame = nn.Sequential()
            frame.add_module("blocks", nn.Sequential(nn.Flatten()))
            frame.add_module("head", nn.Identity())
            kw = dict(repeats=self.repeats, warmup=self.warmup, threads=self.threads)
            # interleaved, so that a change of load hits both
            with_frame, without = [], []
            for _ in range(3):
                with_frame.append(measure_latency(frame, example, **kw))
                without.append(measure_latency(nn.Identity(), example, **kw))
            value = max(0.0, statistics.median(with_frame) - statistics.median(without))
            self.entries[key] = value
            self._dirty = True
            if self._hold == 0:
                self.save()
        return value

    def predict(self, arch: Architecture, shape: InputShape, *, batchnorm: bool = True) -> float:
        """Predicted seconds of ``build(arch, shape, batchnorm=batchnorm)(x)`` for a batch of
        :attr:`batch`: its blocks' entries + its head's + the frame's (see the class
        docstring), each measured on first use. Within :data:`PREDICTION_TOLERANCE` of a
        measured timing in the tests."""
        _check_arch(arch, shape, "predict")
        check_bool(batchnorm, "predict batchnorm")
        with self.deferred_saves():
            total = self.frame_latency(shape)
            for entry in layer_shapes(arch, shape):
                if entry["op"] == "head":
                    total += self.head_latency(entry["in"][0], entry["out"][0])
                else:
                    block = Block(entry["op"], entry["out"][0], entry["pool"])
                    total += self.block_latency(block, entry["in"], batchnorm=batchnorm)
        return total

    # -- the file --------------------------------------------------------------------------

    @contextlib.contextmanager
    def deferred_saves(self) -> Iterator["LatencyTable"]:
        """Entries measured inside the block are saved once, when it ends."""
        self._hold += 1
        try:
            yield self
        finally:
            self._hold -= 1
            if self._hold == 0 and self._dirty:
                self.save()

    def save(self) -> None:
        """Write the table to its file atomically (nothing to do without a path)."""
        if self.path is None:
            self._dirty = False
            return
        data = {"format": _FORMAT, "version": _VERSION, "machine": self.machine,
                "repeats": self.repeats, "warmup": self.warmup, "entries": dict(sorted(self.entries.items()))}
        try:
            atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")
        except OSError as err:
            raise ConfigError(
                f"cannot write latency table {self.path} ({err.strerror or err}); pass a path in a writable "
                "folder, or None to keep the table in memory"
            ) from err
        self._dirty = False

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"LatencyTable({str(self.path) if self.path else 'in memory'}, {len(self.entries)} entries)"


def _check_in_shape(block: Block, in_shape: Any) -> tuple[int, ...]:
    if not isinstance(in_shape, (tuple, list)) or not in_shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in in_shape
    ):
        raise ConfigError(
            f"the input shape of {block.label} must be a tuple of positive integers without the batch, "
            f"(C, H, W) or (features,); got {describe(in_shape)}"
        )
    shape = tuple(in_shape)
    if block.conv and (len(shape) != 3 or shape[1] != shape[2]):
        raise ConfigError(
            f"a conv block ({block.label}) reads square feature maps (C, H, W) with H == W, got {shape}; "
            "take the shapes from layer_shapes(arch, shape)"
        )
    if block.pool and shape[1] < 2:
        raise ConfigError(f"{block.label} pools a {shape[1]}px feature map to nothing; drop its pool")
    return shape


def _read_table(path: Path) -> tuple[dict, dict[str, float]]:
    fix = "delete it (it is measured again on the next run) or pass another path"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"latency table {path} cannot be read ({getattr(err, 'strerror', None) or err}); "
                          f"fix its permissions, or {fix}") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"latency table {path} is corrupted (not JSON: {err}); {fix}") from err
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ConfigError(f"{path} is not a latency table (no format: {_FORMAT!r}); {fix}")
    if data.get("version") != _VERSION:
        raise ConfigError(f"latency table {path} has version {data.get('version')!r}, this secateurs reads "
                          f"version {_VERSION}; {fix}")
    machine, entries = data.get("machine"), data.get("entries")
    if not isinstance(machine, dict) or not isinstance(entries, dict):
        raise ConfigError(f"latency table {path} is corrupted (its machine or entries are missing); {fix}")
    for key, value in entries.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise ConfigError(f"latency table {path} is corrupted (entry {key!r} is {describe(value)}, "
                              f"not a number of seconds >= 0); {fix}")
    return machine, {k: float(v) for k, v in entries.items()}


# ---------------------------------------------------------------------------------------------
# budgets


@dataclass(frozen=True)
class Budget:
    """Limits on a candidate's costs (None: no limit; all None: no budget, everything admitted).

    * ``latency_ms``: predicted milliseconds per batch of the latency table's ``batch``;
    * ``memory_mb``: :func:`peak_memory` in MiB (2**20 bytes), for the same batch;
    * ``macs``: multiply-accumulates per example (:func:`macs`), a plain count (e.g. 5e6).

    A candidate is admitted when each cost is at most its limit."""

    latency_ms: float | None = None
    memory_mb: float | None = None
    macs: int | None = None

    def __post_init__(self) -> None:
        hints = {"latency_ms": "milliseconds per batch, e.g. 2.5", "memory_mb": "MiB (2**20 bytes), e.g. 4",
                 "macs": "multiply-accumulates per example, e.g. 5e6"}
        for name in _METRICS:
            check_number(getattr(self, name), f"budget.{name}", above=0, finite=True, optional=True,
                         numpy=True, hint=f"{hints[name]}; leave it out for no limit")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Budget":
        """From ``{latency_ms, memory_mb, macs}`` (each optional); None or ``{}``: no budget."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"a budget is {{latency_ms, memory_mb, macs}} (each optional), got {describe(data)}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown budget keys {sorted(unknown)}; a budget takes latency_ms, memory_mb and macs")
        return cls(**data)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in _METRICS if getattr(self, name) is not None}

    @property
    def limited(self) -> tuple[str, ...]:
        """The metrics this budget limits."""
        return tuple(name for name in _METRICS if getattr(self, name) is not None)

    def violations(self, costs: Mapping[str, float]) -> list[str]:
        """One line per limit ``costs`` (as :func:`candidate_costs` gives them) exceeds; empty
        when admitted."""
        if not isinstance(costs, Mapping):
            raise ConfigError(f"Budget.violations needs the costs as a dict (candidate_costs(...)), got {describe(costs)}")
        out = []
        for name in self.limited:
            value = costs.get(name)
            if value is None:
                hint = (" (predicted latencies need a LatencyTable: candidate_costs(arch, shape, table))"
                        if name == "latency_ms" else "")
                raise ConfigError(f"the budget limits {name} but the costs carry no {name}{hint}; "
                                  f"pass candidate_costs(...) of the candidate, or drop {name} from the budget")
            limit = getattr(self, name)
            if value > limit:
                out.append(f"{_LABELS[name]} {_fmt(name, value)} > budget {_fmt(name, limit)}")
        return out

    def admits(self, costs: Mapping[str, float]) -> bool:
        return not self.violations(costs)

    def __str__(self) -> str:
        return ", ".join(f"{_LABELS[n]} <= {_fmt(n, getattr(self, n))}" for n in self.limited) or "no budget"


_LABELS = {"latency_ms": "latency", "memory_mb": "memory", "macs": "MACs"}


def _fmt(name: str, value: float) -> str:
    if name == "latency_ms":
        return f"{value:.4g} ms"
    if name == "memory_mb":
        return f"{value:.4g} MiB"
    return f"{value:,.0f}"


def candidate_costs(arch: Architecture, shape: InputShape, table: LatencyTable | None, *, batchnorm: bool = True,
                    batch: int | None = None) -> dict:
    """``{"latency_ms", "memory_mb", "macs", "parameters"}`` of a candidate, in :class:`Budget`'s
    units: predicted latency (None without a table), :func:`peak_memory` in MiB, MACs per
    example, the parameter count. Latency and memory are for a batch of ``batch`` (None: the
    table's batch, or 1 without a table)."""
    _check_arch(arch, shape, "candidate_costs")
    check_bool(batchnorm, "candidate_costs batchnorm")
    if table is not None and not isinstance(table, LatencyTable):
        raise ConfigError(f"candidate_costs needs a LatencyTable or None, got {describe(table)}; use LatencyTable.open(path)")
    if batch is None:
        batch = table.batch if table is not None else 1
    check_int(batch, "candidate_costs batch", minimum=1)
    if table is not None and batch != table.batch:
        raise ConfigError(f"candidate_costs batch {batch} differs from the latency table's batch {table.batch}; "
                          f"open the table with batch={batch}, or leave batch out")
    costs = _walk(arch, shape, batchnorm)
    return {
        "latency_ms": table.predict(arch, shape, batchnorm=batchnorm) * 1e3 if table is not None else None,
        "memory_mb": _memory_bytes(costs, batch) / _MIB,
        "macs": costs.macs,
        "parameters": costs.params,
    }


# ---------------------------------------------------------------------------------------------
# the cheapest candidates of a space


class _Search:
    """Every candidate of ``space`` is a chain that :meth:`SearchSpace.expand` grows from the
    empty chain, one block at a time, and every chain of one or more blocks it reaches is a
    candidate. Each cost of a chain without its head (MACs, parameters, block latencies,
    weights + the activations alive so far) only grows when a block is appended, and the head
    only adds to it, so it is a lower bound for every candidate that extends the chain: a
    subtree whose bound already exceeds a limit (or the best value found) holds no better
    candidate and is skipped. That makes both searches below exact.

    (The cheapest candidate is not always a one-block one: a narrow fc block before the
    head can cost less than the head it shrinks, e.g. ``conv3-8p.fc-32`` has fewer MACs than
    ``conv3-8p`` with 100 classes.)"""

    def __init__(self, space: SearchSpace, shape: InputShape, table: LatencyTable | None, batchnorm: bool,
                 batch: int) -> None:
        self.space, self.shape, self.table, self.batchnorm, self.batch = space, shape, table, batchnorm, batch

    def _block_latency(self, block: Block, in_shape: tuple[int, ...]) -> float:
        return self.table.block_latency(block, in_shape, batchnorm=self.batchnorm)

    def children(self, prefix: _Prefix, metrics: tuple[str, ...]) -> list[_Prefix]:
        latency = self._block_latency if "latency_ms" in metrics else None
        return [_extend(prefix, a.blocks[-1], self.shape, batchnorm=self.batchnorm, latency=latency)
                for a in self.space.expand(Architecture(prefix.blocks), self.shape)]

    def bound(self, prefix: _Prefix, metric: str) -> float:
        if metric == "latency_ms":
            return prefix.latency_s * 1e3
        if metric == "memory_mb":
            return _memory_bytes(prefix, self.batch) / _MIB
        return float(prefix.macs)

    def value(self, prefix: _Prefix, metric: str) -> float:
        if metric == "latency_ms":
            costs = _finish(prefix, self.shape, head_latency=self.table.head_latency)
            return (costs.latency_s + self.table.frame_latency(self.shape)) * 1e3
        costs = _finish(prefix, self.shape)
        return _memory_bytes(costs, self.batch) / _MIB if metric == "memory_mb" else costs.macs

    def admitted(self, budget: Budget) -> _Prefix | None:
        """A candidate that meets every limit of ``budget``, or None."""
        metrics = budget.limited

        def visit(prefix: _Prefix) -> _Prefix | None:
            for child in self.children(prefix, metrics):
                if any(self.bound(child, m) > getattr(budget, m) for m in metrics):
                    continue
                if all(self.value(child, m) <= getattr(budget, m) for m in metrics):
                    return child
                found = visit(child)
                if found is not None:
                    return found
            return None

        return visit(_start(self.shape))

    def cheapest(self, metric: str) -> tuple[float, Architecture]:
        """The smallest ``metric`` of any candidate, and a candidate that has it."""
        best: list = [math.inf, None]

        def visit(prefix: _Prefix) -> None:
            children = sorted(self.children(prefix, (metric,)), key=lambda c: self.bound(c, metric))
            for child in children:
                if self.bound(child, metric) >= best[0]:
                    break  # sorted: the rest are no better
                value = self.value(child, metric)
                if value < best[0]:
                    best[:] = [value, Architecture(child.blocks)]
                visit(child)

        visit(_start(self.shape))
        return best[0], best[1]


def _check_search_args(budget: Any, space: Any, shape: Any, table: Any) -> None:
    if not isinstance(budget, Budget):
        raise ConfigError(f"check_budget_feasible needs a Budget, got {describe(budget)}; use Budget(latency_ms=..., ...)")
    if not isinstance(space, SearchSpace):
        raise ConfigError(f"check_budget_feasible needs a SearchSpace, got {describe(space)}")
    if not isinstance(shape, InputShape):
        raise ConfigError(f"check_budget_feasible needs an InputShape, got {describe(shape)}")
    if table is not None and not isinstance(table, LatencyTable):
        raise ConfigError(f"check_budget_feasible needs a LatencyTable or None, got {describe(table)}")


def cheapest(space: SearchSpace, shape: InputShape, table: LatencyTable | None, metric: str, *,
             batchnorm: bool = True) -> tuple[float, Architecture]:
    """The smallest value of ``metric`` (``latency_ms``, ``memory_mb`` or ``macs``, in
    :class:`Budget`'s units) over every candidate of ``space``, and a candidate with it.
    Exact: a branch-and-bound over the space (see :class:`_Search`)."""
    _check_search_args(Budget(), space, shape, table)
    if metric not in _METRICS:
        raise ConfigError(f"cheapest: unknown metric {metric!r}; use one of {', '.join(_METRICS)}")
    if metric == "latency_ms" and table is None:
        raise ConfigError("cheapest('latency_ms') needs a LatencyTable to predict latencies; pass LatencyTable.open(path)")
    batch = table.batch if table is not None else 1
    search = _Search(space, shape, table, batchnorm, batch)
    if table is None:
        return search.cheapest(metric)
    with table.deferred_saves():
        return search.cheapest(metric)


def check_budget_feasible(budget: Budget, space: SearchSpace, shape: InputShape, table: LatencyTable | None, *,
                          batchnorm: bool = True) -> None:
    """Refuse, before a search starts, a budget that no candidate of ``space`` meets.

    Searches the space for a candidate within every limit (exact, see :class:`_Search`;
    latencies are predicted by ``table`` and measured on first use). When there is none, the
    :class:`ConfigError` names, per limited metric, the smallest cost of any candidate and a
    candidate that has it (the minima may come from different candidates, so a budget can be
    out of reach even when each limit alone is not). A budget that limits latency needs a
    ``table``. A budget with no limits admits everything."""
    _check_search_args(budget, space, shape, table)
    check_bool(batchnorm, "check_budget_feasible batchnorm")
    if not budget.limited:
        return
    if budget.latency_ms is not None and table is None:
        raise ConfigError(
            f"the budget limits latency ({_fmt('latency_ms', budget.latency_ms)}) but no latency table was given; "
            "pass LatencyTable.open(path) so latencies can be measured and predicted, or drop latency_ms"
        )
    batch = table.batch if table is not None else 1
    search = _Search(space, shape, table, batchnorm, batch)
    with table.deferred_saves() if table is not None else contextlib.nullcontext():
        if search.admitted(budget) is not None:
            return
        minima = {m: search.cheapest(m) for m in budget.limited}
    smallest = ", ".join(f"{_LABELS[m]} {_fmt(m, v)} ({a.label})" for m, (v, a) in minima.items())
    alone = [_LABELS[m] for m, (v, _) in minima.items() if v > getattr(budget, m)]
    why = (f"; out of reach even alone: {', '.join(alone)}" if alone else
           "; each limit alone is met by some candidate, but no candidate meets all of them at once")
    raise ConfigError(
        f"no candidate of the search space meets the budget ({budget}): the smallest candidates cost "
        f"{smallest}{why}. Raise the limits to at least these, or give the space cheaper blocks "
        "(narrower widths, dwsep ops, more pools)"
    )
