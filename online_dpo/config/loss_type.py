"""The one list of `dpo.loss` names (`LossType`) and what each loss needs from a round: the
config validates a name against it, and the training code dispatches on it."""

from __future__ import annotations

import difflib
from enum import StrEnum


class LossType(StrEnum):
    """A DPO-family loss. The properties say what the round must provide for it."""

    SIGMOID = "sigmoid"  # DPO; with label_smoothing > 0, conservative DPO
    ROBUST = "robust"  # robust DPO
    IPO = "ipo"
    HINGE = "hinge"  # SLiC
    SIMPO = "simpo"  # reference-free, length-normalised
    ORPO = "orpo"  # reference-free, odds ratio + NLL
    KTO = "kto"  # unpaired: desirable / undesirable examples

    @property
    def needs_reference(self) -> bool:
        """The loss compares the policy with reference log-probs (the round computes them)."""
        return self not in (LossType.SIMPO, LossType.ORPO)

    @property
    def unpaired(self) -> bool:
        """The loss trains on labelled single responses instead of (chosen, rejected) pairs."""
        return self is LossType.KTO

    @property
    def takes_label_smoothing(self) -> bool:
        return self in (LossType.SIGMOID, LossType.ROBUST)

    @property
    def takes_soft_labels(self) -> bool:
        """The loss can train a kept tie toward a 0.5 preference (pairs.drop_ties=false)."""
        return self is LossType.SIGMOID

    @property
    def nll_by_default(self) -> bool:
        """dpo.rpo_alpha=auto adds the chosen responses' NLL (iterative RPO) to this loss: the
        pairwise losses with a reference; SimPO and ORPO have their own terms, KTO no chosen side."""
        return self.needs_reference and not self.unpaired

    @classmethod
    def _missing_(cls, value):
        names = [t.value for t in cls]
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown dpo.loss {value!r}; {hint}available: {', '.join(names)}")
