"""Each loss against its closed form written out here (never by calling the implementation), gradient
directions, the reduction identities, and no NaN on edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import AlgorithmConfig
from common.methods import METHODS, get_method, register
from rewards.pairs import GROUP_BUILDERS
from workers.losses import LOSSES, LossInputs, dpo_loss, ipo_loss, rrhf_loss, slic_loss, wdpo_loss

LOGPS = torch.tensor([[-3.0, -5.0], [-4.0, -2.0]])
REF = torch.tensor([[-3.5, -4.5], [-4.0, -3.0]])
LENS = torch.tensor([[3.0, 5.0], [4.0, 2.0]])
REW = torch.tensor([[1.0, 0.2], [0.9, 0.5]])


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def inputs(**kw) -> LossInputs:
    base = dict(logps=LOGPS.clone(), lengths=LENS, rewards=REW, ref_logps=REF)
    base.update(kw)
    return LossInputs(**base)


def test_dpo_closed_form():
    cfg = AlgorithmConfig(name="dpo", beta=0.5)
    loss, stats = dpo_loss(inputs(), cfg)
    # row 0: h = (-3 + 3.5) - (-5 + 4.5) = 1.0 ; row 1: h = 0 - 1 = -1
    expect = [-math.log(sig(0.5 * 1.0)), -math.log(sig(0.5 * -1.0))]
    assert loss.tolist() == pytest.approx(expect, rel=1e-6)
    assert stats["pair_accuracy"].tolist() == [1.0, 0.0]


def test_dpo_label_smoothing_and_nll():
    cfg = AlgorithmConfig(name="dpo", beta=0.5, label_smoothing=0.1, nll_coef=2.0)
    loss, _ = dpo_loss(inputs(), cfg)
    h0 = 1.0
    expect0 = -0.9 * math.log(sig(0.5 * h0)) - 0.1 * math.log(sig(-0.5 * h0)) + 2.0 * (3.0 / 3.0)
    assert float(loss[0]) == pytest.approx(expect0, rel=1e-6)


def test_ipo_closed_form_length_normalised():
    cfg = AlgorithmConfig(name="ipo", beta=0.25)
    loss, _ = ipo_loss(inputs(), cfg)
    hb0 = (-3 + 3.5) / 3 - (-5 + 4.5) / 5
    hb1 = (-4 + 4.0) / 4 - (-2 + 3.0) / 2
    assert loss.tolist() == pytest.approx([(hb0 - 2.0) ** 2, (hb1 - 2.0) ** 2], rel=1e-6)


def test_slic_closed_form():
    cfg = AlgorithmConfig(name="slic", slic_delta=1.5, slic_lambda=0.3)
    sft = torch.tensor([-6.0, -1.0])
    loss, _ = slic_loss(inputs(ref_logps=None, sft_logps=sft), cfg)
    expect = [max(0.0, 1.5 - (-3.0) + (-5.0)) + 0.3 * 6.0, max(0.0, 1.5 - (-4.0) + (-2.0)) + 0.3 * 1.0]
    assert loss.tolist() == pytest.approx(expect, rel=1e-6)


def test_rrhf_closed_form_three_responses():
    cfg = AlgorithmConfig(name="rrhf", rrhf_sft_weight=0.5)
    logps = torch.tensor([[-2.0, -1.0, -6.0]])
    lens = torch.tensor([[2.0, 1.0, 3.0]])
    rewards = torch.tensor([[1.0, 0.5, 0.0]])
    loss, _ = rrhf_loss(LossInputs(logps=logps, lengths=lens, rewards=rewards), cfg)
    p = [-1.0, -1.0, -2.0]
    r = [1.0, 0.5, 0.0]
    rank = sum(max(0.0, p[i] - p[j]) for i in range(3) for j in range(3) if r[i] < r[j])
    assert float(loss[0]) == pytest.approx(rank + 0.5 * 1.0, rel=1e-6)
    # a violated ranking costs something
    bad = LossInputs(
        logps=torch.tensor([[-6.0, -1.0]]), lengths=torch.tensor([[1.0, 1.0]]), rewards=torch.tensor([[1.0, 0.0]])
    )
    assert float(rrhf_loss(bad, AlgorithmConfig(name="rrhf", rrhf_sft_weight=0.0))[0][0]) == pytest.approx(5.0)


@pytest.mark.parametrize("fn,g", [("exp", math.exp), ("sigmoid", lambda x: 2 * sig(x)), ("linear", lambda x: 1 + x)])
def test_wdpo_weights_closed_form(fn, g):
    cfg = AlgorithmConfig(name="wdpo", beta=0.5, wdpo_beta2=2.0, wdpo_weight_fn=fn, wdpo_normalize_weights=True)
    loss, stats = wdpo_loss(inputs(), cfg)
    raw = [g(2.0 * 0.8), g(2.0 * 0.4)]
    w = [x / (sum(raw) / 2) for x in raw]
    dpo = [-math.log(sig(0.5)), -math.log(sig(-0.5))]
    assert stats["pair_weight"].tolist() == pytest.approx(w, rel=1e-5)
    assert loss.tolist() == pytest.approx([w[0] * dpo[0], w[1] * dpo[1]], rel=1e-5)


def test_wdpo_beta2_zero_is_dpo():
    for fn in ("exp", "sigmoid", "linear"):
        cfg = AlgorithmConfig(name="wdpo", beta=0.3, wdpo_beta2=0.0, wdpo_weight_fn=fn, nll_coef=0.5)
        assert torch.equal(wdpo_loss(inputs(), cfg)[0], dpo_loss(inputs(), cfg)[0])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradient_raises_chosen_lowers_rejected(name):
    loss_fn = LOSSES[get_method(name).loss]
    cfg = AlgorithmConfig(name=name, rrhf_sft_weight=0.0)
    logps = torch.tensor([[-4.0, -3.0]], requires_grad=True)  # chosen currently less likely
    inp = LossInputs(
        logps=logps,
        lengths=torch.tensor([[2.0, 2.0]]),
        rewards=torch.tensor([[1.0, 0.0]]),
        ref_logps=torch.tensor([[-4.0, -3.0]]),
        sft_logps=torch.tensor([-5.0]),
    )
    loss_fn(inp, cfg)[0].sum().backward()
    # gradient descent moves along -grad: chosen up (grad < 0), rejected down (grad > 0)
    assert logps.grad[0, 0] < 0 and logps.grad[0, 1] > 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_nan_on_empty_truncated_and_equal_responses(name):
    loss_fn = LOSSES[get_method(name).loss]
    cfg = AlgorithmConfig(name=name)
    logps = torch.tensor([[0.0, 0.0], [-2.0, -2.0]], requires_grad=True)  # empty pair; chosen == rejected
    inp = LossInputs(
        logps=logps,
        lengths=torch.tensor([[0.0, 0.0], [3.0, 3.0]]),
        rewards=torch.tensor([[1.0, 0.0], [0.5, 0.5]]),
        ref_logps=torch.tensor([[0.0, 0.0], [-2.0, -2.0]]),
        sft_logps=torch.tensor([0.0, -1.0]),
    )
    loss, _ = loss_fn(inp, cfg)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logps.grad).all()


def test_registry_is_what_the_config_accepts():
    from common.config import ConfigError
    from common.config_files import load_config

    for name in METHODS:
        n = "1" if get_method(name).max_samples == 1 else "4"
        assert load_config(None, [f"algorithm.name={name}", f"rollout.n_samples={n}"]).algorithm.name == name
        assert get_method(name).loss in LOSSES
        assert get_method(name).pairs in GROUP_BUILDERS
    with pytest.raises(ConfigError, match="'ppo' is not a registered method.*dpo, ipo"):
        load_config(None, ["algorithm.name=ppo"])
    with pytest.raises(ValueError, match="unknown algorithm.name 'ppo'"):
        get_method("ppo")


def test_a_name_registers_once():
    """A loss or a group builder registered twice under one name would silently replace the first."""
    with pytest.raises(ValueError, match="loss 'dpo' is already registered"):
        LOSSES.register("dpo")(dpo_loss)
    with pytest.raises(ValueError, match="group builder 'best_worst' is already registered"):
        GROUP_BUILDERS.register("best_worst")(GROUP_BUILDERS["best_worst"])
    with pytest.raises(ValueError, match="method 'dpo' is already registered"):
        register(get_method("dpo"))
    assert LOSSES["dpo"] is dpo_loss
