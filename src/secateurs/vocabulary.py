"""The one vocabulary of scopes and resets: each name defined once, with its meaning.

A procedure that accepts only some of the names declares its subset here (:class:`Subset`),
with the reason, so a refused name gets one answer: which names that procedure accepts and
why the others do not apply. ``secateurs list`` prints this module.

Scopes say how a sparsity budget (or a pruning rate) is shared among layers; resets say
what weights (and, for the lottery's retraining, which learning rate) a pruned network
trains from next.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .errors import UnknownNameError


@dataclass(frozen=True)
class Vocabulary:
    """Names of one kind (``"scope"``, ``"reset"``) with their meanings; ``aliases`` are old
    spellings still read (each maps to its name here)."""

    kind: str
    meanings: Mapping[str, str]
    aliases: Mapping[str, str] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.meanings)

    def __contains__(self, name: object) -> bool:
        return name in self.meanings

    def names(self) -> tuple[str, ...]:
        return tuple(self.meanings)

    def subset(self, procedure: str, names: tuple[str, ...], why: str) -> "Subset":
        missing = [n for n in names if n not in self.meanings]
        if missing:
            raise ValueError(f"{procedure}: {missing} are not {self.kind}s of the vocabulary")
        return Subset(self, procedure, names, why)

    def check(self, value: object, what: str) -> str:
        """``value`` as a name of the whole vocabulary (an alias read as its name)."""
        return self.subset("secateurs", self.names(), "").check(value, what)


@dataclass(frozen=True)
class Subset:
    """The names of a :class:`Vocabulary` one procedure accepts, and why only those."""

    vocabulary: Vocabulary
    procedure: str
    names: tuple[str, ...]
    why: str

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def check(self, value: object, what: str) -> str:
        """The accepted name ``value`` stands for (an old spelling is read as its new name);
        anything else raises :class:`UnknownNameError` naming the accepted ones."""
        vocab, kind = self.vocabulary, self.vocabulary.kind
        name = vocab.aliases.get(value, value) if isinstance(value, str) else value
        if name in self.names:
            return name
        accepted = ", ".join(self.names)
        why = f" ({self.why})" if self.why else ""
        if name in vocab.meanings:
            raise UnknownNameError(f"{what} {value!r} does not apply to {self.procedure}: it accepts the {kind}s "
                                   f"{accepted}{why}")
        if len(self.names) == len(vocab.meanings):
            raise UnknownNameError(f"unknown {what} {value!r}; known {kind}s: {accepted}")
        raise UnknownNameError(f"unknown {what} {value!r}; {self.procedure} accepts the {kind}s: {accepted}{why}")

SCOPES = Vocabulary("scope", MappingProxyType({
    "global": "one score threshold (one ranking) across all layers: layers end at different sparsities",
    "uniform": "each layer by its own threshold at the same sparsity or rate (per-layer overrides aside); "
               "'layerwise' is its old spelling",
    "erk": "Erdos-Renyi-Kernel densities (Evci et al. 2020): larger layers sparser, kernel size counted",
    "er": "Erdos-Renyi densities (Mocanu et al. 2018): as erk without the kernel size",
}), aliases=MappingProxyType({"layerwise": "uniform"}))

RESETS = Vocabulary("reset", MappingProxyType({
    "keep": "the trained weights stay; the next phase trains with its own configured schedule (fine-tuning)",
    "rewind": "weights back to the initialisation or to iteration k of the dense run "
              "(Frankle & Carbin 2019; Frankle et al. 2020), then trained again",
    "reinit": "weights from a fresh, independent random initialisation (Scratch-E / -B, Liu et al. 2019)",
    "lr_rewind": "the trained weights stay and the learning-rate schedule replays from iteration k (Renda et al. 2020)",
    "finetune": "the trained weights stay and train retrain_epochs at the dense schedule's final learning rate",
    "linear_decay": "the trained weights stay and train retrain_epochs with the learning rate decayed linearly "
                    "to 0 (Zimmer et al. 2023), without warm-up",
    "llr": "LLR (Zimmer et al. 2023): the trained weights stay; 10% linear warm-up to the dense schedule's largest "
           "learning rate, then linear decay to 0",
    "slr": "SLR (Le & Hua 2021): the trained weights stay; 10% warm-up to the largest learning rate, then the dense "
           "schedule compressed into the rest of the retraining",
    "clr": "CLR (Le & Hua 2021): the trained weights stay; 10% warm-up to the largest learning rate, then one "
           "cosine cycle down to the dense schedule's smallest one",
    "allr": "ALLR (Zimmer et al. 2023): LLR from an adaptive peak, the largest learning rate times the relative "
            "norm of the pruned weights over sqrt(share pruned), clipped to [retrain/dense epochs, 1] of it",
}))

#: where each procedure accepts only some of the names, and why
ALLOCATION_SCOPES = SCOPES.subset("allocation", SCOPES.names(), "")
IMP_SCOPES = SCOPES.subset(
    "IMP (lottery.scope, LotteryTicket)", ("uniform", "global"),
    "a round removes a rate of the remaining weights, of each layer or of all of them; erk / er split a "
    "fixed budget and have no per-round rate",
)
STRUCTURED_SCOPES = SCOPES.subset(
    "structured pruning (structured.scope, plan_removal)", ("uniform", "global"),
    "channels are removed by a share of each group or by one ranking across groups; erk / er are "
    "densities of unstructured layers",
)
SWEEP_RESETS = RESETS.subset(
    "pruning sweeps (prune.reset)", ("keep", "rewind", "reinit"),
    "a sweep's learning rate after pruning is the finetune section's schedule; the lottery's "
    "lr_rewind / finetune / linear_decay / llr / slr / clr / allr are learning-rate policies of `secateurs lottery`",
)
LOTTERY_RESETS = RESETS.subset(
    "secateurs lottery (lottery.reset)",
    ("rewind", "lr_rewind", "finetune", "linear_decay", "llr", "slr", "clr", "allr"),
    "each names the weights and the learning rate of a round's retraining; keep says nothing about the "
    "learning rate (use finetune or lr_rewind), and a fresh initialisation is a control (lottery.controls: "
    "[reinit])",
)
IMP_RESETS = RESETS.subset(
    "LotteryTicket", ("rewind", "keep"),
    "the sparsifier resets only the weights; the learning rate of the next round is the training loop's",
)

#: every subset, for ``secateurs list``
SUBSETS = (IMP_SCOPES, STRUCTURED_SCOPES, SWEEP_RESETS, LOTTERY_RESETS, IMP_RESETS)
