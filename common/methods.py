"""The one registry of alignment methods: what each trains on and how, in a torch-free module.

An entry carries the name of its loss (registered where it is defined, `@workers.losses.LOSSES.register`), the
name of the function that builds its training group from one prompt's scored samples
(`@rewards.pairs.GROUP_BUILDERS.register`), and the traits that the config, the reward actor and the trainer
read. Adding a method is one `register(Method(...))` here (plus a registered loss, or group builder, when it
needs a new one; a test checks that every name resolves). What
each method trains on follows its paper (cited on each loss in `workers.losses`); README's table sums it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    loss: str  # a loss's registered name (workers.losses)
    pairs: str  # a group builder's registered name (rewards.pairs): how one prompt's samples become its group
    summary: str
    min_samples: int = 2  # rollout.n_samples needed per prompt
    max_samples: int | None = None
    # initial | previous: the user chooses (algorithm.reference); "previous": the paper fixes it.
    reference: Literal["configurable", "previous", "none"] = "configurable"
    scores_sft_target: bool = False  # the loss needs log pi(y_ref | x) of the dataset's target (SLiC-HF)
    needs_sft_target: bool = False  # the dataset must have a response column (SLiC-HF's y_ref, SPIN's y+)
    mixes_previous: bool = False  # the previous iteration's groups join the batch (SPIN)
    extrapolates: bool = False  # Nesterov step between iterations (APO)
    weighted: bool = False  # per-pair weights normalised over the iteration's whole batch (OPTune's wDPO)

    @property
    def needs_reference(self) -> bool:
        return self.reference != "none"


METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    return METHODS.register(method.name)(method)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm.name '{name}'; choose one of: {', '.join(METHODS)}") from None


register(Method("dpo", "dpo", "best_worst", "iterative DPO: best vs worst of this iteration's samples"))
register(Method("ipo", "ipo", "best_worst", "IPO: best vs worst, squared log-ratio loss"))
register(
    Method(
        "slic",
        "slic",
        "best_worst",
        "SLiC-HF: hinge on best vs worst plus lambda * NLL of the dataset's target",
        reference="none",
        scores_sft_target=True,
        needs_sft_target=True,
    )
)
register(Method("rrhf", "rrhf", "ranked_list", "RRHF: all k samples ranked", reference="none"))
register(Method("wdpo", "wdpo", "best_worst", "OPTune's weighted DPO: best vs worst", weighted=True))
# SPIN (arXiv 2401.01335): y+ = the ground truth, y- = the current policy's own generation for the prompt
# (one per prompt), the previous iterate as opponent (reference), and the previous iteration's pairs mixed in.
register(
    Method(
        "spin",
        "dpo",
        "ground_truth",
        "SPIN: ground truth vs the policy's own sample, previous iterate as opponent",
        min_samples=1,
        max_samples=1,
        reference="previous",
        needs_sft_target=True,
        mixes_previous=True,
    )
)
# APO (arXiv 2410.06293): iterative DPO with reference = the previous iterate, then a Nesterov step.
register(
    Method(
        "apo",
        "dpo",
        "best_worst",
        "APO: iterative DPO + theta <- theta_hat + alpha (theta_hat - theta_hat_prev)",
        reference="previous",
        extrapolates=True,
    )
)
