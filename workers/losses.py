"""Preference losses, each registered under its name in `LOSSES` where it is defined (`@LOSSES.register`); each
method in `common.methods` names the one it trains with.

Every loss is a pure function of summed response log-probs (see `workers.logprobs`), so it can be
checked on fixed tensors. Inputs are `[B, K]` tensors with the K responses of a prompt ranked best
first (K = 2: index 0 is chosen y+, index 1 rejected y-). Each returns the per-prompt loss `[B]`
(the trainer takes the mean) and a dict of detached per-prompt diagnostics.

Notation: l(y) = log pi_theta(y|x) summed over response tokens, r(y) = log pi_ref(y|x), |y| its token
count, h = (l(y+) - r(y+)) - (l(y-) - r(y-)) the DPO log-ratio margin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import AlgorithmConfig
from common.registry import Registry


@dataclass
class LossInputs:
    logps: torch.Tensor  # [B, K] policy log-probs, summed over response tokens
    lengths: torch.Tensor  # [B, K] response token counts
    rewards: torch.Tensor  # [B, K] reward-model scores
    ref_logps: torch.Tensor | None = None  # [B, K] reference log-probs (None for reference-free methods)
    sft_logps: torch.Tensor | None = None  # [B] log pi(y_ref | x) of the dataset's SFT target
    # [B] wDPO pair weights, normalised over the iteration's whole batch by the trainer (None: this batch)
    weights: torch.Tensor | None = None


LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]
LossFn = Callable[[LossInputs, AlgorithmConfig], LossOutput]

# Loss name (common.methods.Method.loss) -> function, each registered where it is defined.
LOSSES: Registry[LossFn] = Registry("loss")


def _per_token(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-prob; an empty response counts as length 1 (its log-prob is 0)."""
    return logps / lengths.clamp(min=1)


def _chosen_nll(inp: LossInputs) -> torch.Tensor:
    """Per-token NLL of the chosen response, -l(y+)/|y+| (Iterative RPO, arXiv 2404.19733)."""
    return -_per_token(inp.logps[:, 0], inp.lengths[:, 0])


def _margin(inp: LossInputs) -> torch.Tensor:
    assert inp.ref_logps is not None, "this loss needs reference log-probs"
    ratios = inp.logps - inp.ref_logps
    return ratios[:, 0] - ratios[:, 1]


def _pair_stats(score: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pair_accuracy": (score > 0).float().detach(), "margin": score.detach()}


@LOSSES.register("dpo")
def dpo_loss(inp: LossInputs, cfg: AlgorithmConfig) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), with optional cDPO label smoothing eps:

        L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)  [+ nll_coef * -l(y+)/|y+|]

    The optional NLL term on the chosen response is Iterative RPO's (arXiv 2404.19733); on tiny models
    it prevents the likelihood displacement that makes pure DPO lower the reward it optimises.
    """
    h = _margin(inp)
    eps = cfg.label_smoothing
    loss = -(1 - eps) * F.logsigmoid(cfg.beta * h) - eps * F.logsigmoid(-cfg.beta * h)
    return loss + cfg.nll_coef * _chosen_nll(inp), _pair_stats(h)


@LOSSES.register("ipo")
def ipo_loss(inp: LossInputs, cfg: AlgorithmConfig) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036), length-normalised as agreed with the authors:

        h_bar = (l(y+) - r(y+)) / |y+| - (l(y-) - r(y-)) / |y-|,   L = (h_bar - 1 / (2 * beta))^2

    Zero lengths are guarded (counted as 1; an empty response has log-ratio 0).
    """
    assert inp.ref_logps is not None, "ipo needs reference log-probs"
    ratios = _per_token(inp.logps - inp.ref_logps, inp.lengths)
    h_bar = ratios[:, 0] - ratios[:, 1]
    loss = (h_bar - 1.0 / (2.0 * cfg.beta)) ** 2
    return loss + cfg.nll_coef * _chosen_nll(inp), _pair_stats(h_bar)


@LOSSES.register("slic")
def slic_loss(inp: LossInputs, cfg: AlgorithmConfig) -> LossOutput:
    """SLiC-HF (Zhao et al. 2023, arXiv 2305.10425), rank calibration plus SFT regulariser:

        L = max(0, delta - l(y+) + l(y-)) - lambda * l(y_ref)

    y_ref is the dataset's SFT target. No reference model.
    """
    assert inp.sft_logps is not None, "slic needs the dataset's SFT target (y_ref)"
    diff = inp.logps[:, 0] - inp.logps[:, 1]
    loss = torch.relu(cfg.slic_delta - diff) - cfg.slic_lambda * inp.sft_logps
    return loss + cfg.nll_coef * _chosen_nll(inp), _pair_stats(diff)


@LOSSES.register("rrhf")
def rrhf_loss(inp: LossInputs, cfg: AlgorithmConfig) -> LossOutput:
    """RRHF (Yuan et al. 2023, arXiv 2304.05302) over K ranked responses:

        p_i = l(y_i) / |y_i|,   L = sum_{r_i < r_j} max(0, p_i - p_j) + w * (-l(y_best) / |y_best|)

    with w = `rrhf_sft_weight`. y_best is index 0 (responses arrive ranked by reward).
    """
    p = _per_token(inp.logps, inp.lengths)  # [B, K]
    worse = inp.rewards.unsqueeze(2) < inp.rewards.unsqueeze(1)  # [B, i, j]: r_i < r_j
    rank = (torch.relu(p.unsqueeze(2) - p.unsqueeze(1)) * worse).sum(dim=(1, 2))
    loss = rank + cfg.rrhf_sft_weight * _chosen_nll(inp)
    return loss, _pair_stats(p[:, 0] - p[:, -1])


def wdpo_weights(reward_gap: torch.Tensor, cfg: AlgorithmConfig) -> torch.Tensor:
    """OPTune's pair weight g(beta2 * (r(y+) - r(y-))), normalised to mean 1 over the batch by default.

    The paper (arXiv 2406.07657) leaves g open; here g is one of
      exp:     g(x) = exp(x)
      sigmoid: g(x) = 2 * sigmoid(x)
      linear:  g(x) = 1 + x   (clamped at 0)
    each chosen so that g(0) = 1, hence beta2 = 0 gives weight 1 for every pair, i.e. plain DPO.
    Weights are constants (no gradient flows through the reward).
    """
    x = cfg.wdpo_beta2 * reward_gap.detach()
    if cfg.wdpo_weight_fn == "exp":
        # exp(x - max) is overflow-safe and, after mean normalisation, equal to exp(x).
        shift = x.max() if (cfg.wdpo_normalize_weights and x.numel()) else torch.zeros(())
        w = torch.exp((x - shift).clamp(max=50.0))
    elif cfg.wdpo_weight_fn == "sigmoid":
        w = 2.0 * torch.sigmoid(x)
    else:
        w = (1.0 + x).clamp(min=0.0)
    if cfg.wdpo_normalize_weights and w.numel():
        w = w / w.mean().clamp(min=1e-12)
    return w


@LOSSES.register("wdpo")
def wdpo_loss(inp: LossInputs, cfg: AlgorithmConfig) -> LossOutput:
    """Weighted DPO of OPTune (Chen et al. 2024, arXiv 2406.07657):

        L_i = g(beta2 * (R(y+_i) - R(y-_i))) * L_DPO,i

    see `wdpo_weights` for g. With beta2 = 0 every weight is 1 and this is exactly `dpo_loss`. The trainer
    passes `inp.weights` computed over the iteration's whole batch (all ranks), so a pair's weight does
    not depend on the micro-batch it lands in; without them the weights are normalised over `inp`.
    """
    loss, stats = dpo_loss(inp, cfg)
    w = inp.weights if inp.weights is not None else wdpo_weights(inp.rewards[:, 0] - inp.rewards[:, 1], cfg)
    stats["pair_weight"] = w
    return w * loss, stats
