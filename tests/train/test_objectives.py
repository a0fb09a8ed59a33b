"""PPO and PRIME update rules on tiny cases, against values worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from rlsparse.train import objectives as ob


def test_gae_matches_the_hand_computed_example():
    # One 3-token completion and one 2-token completion padded to 3 (its padding is ignored).
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.3, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ob.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - .4 = .6; d1 = .9*.4 - .2 = .16; d0 = .9*.2 - .5 = -.32
    #        A2 = .6; A1 = .16 + .72*.6 = .592; A0 = -.32 + .72*.592 = .10624
    # row 1: d1 = -1 + 0 - .3 = -1.3; d0 = .5 + .9*.3 - .1 = .67; A1 = -1.3; A0 = .67 + .72*(-1.3) = -.266
    expected = torch.tensor([[0.10624, 0.592, 0.6], [-0.266, -1.3, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    adv, _ = ob.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, to_go - values)


def test_kl_penalty_is_folded_into_each_token_and_the_score_at_the_last():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -0.4]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-0.2, -0.1, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = ob.kl_penalized_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, kl_coef=0.1)
    # row 0: -.1*(.5, 0, .5) + (0, 0, 1); row 1: -.1*(0, -.2) + (0, 2), padding 0
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.95], [0.0, 2.02, 0.0]]))


def test_whitening_over_valid_tokens_only():
    values = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # mean 2, population variance 2/3
    s = math.sqrt(2 / 3 + 1e-8)
    torch.testing.assert_close(ob.whiten(values, mask), torch.tensor([[-1 / s, 0.0], [1 / s, 0.0]]))


def test_clipped_policy_loss_and_gradient_by_hand():
    # ratios 1.5, 0.5, 1.1, 0.5 against advantages +1, -1, +2, +1 with epsilon 0.2:
    #   -A*rho vs -A*clip(rho):  -1.5 vs -1.2 -> -1.2 (clipped, no gradient)
    #                             0.5 vs  0.8 ->  0.8 (clipped, no gradient)
    #                            -2.2 vs -2.2 -> -2.2 (inside the range: gradient -A*rho/4 = -.55)
    #                            -0.5 vs -0.8 -> -0.5 (unclipped side wins: gradient -A*rho/4 = -.125)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    loss, clip_fraction = ob.clipped_policy_loss(logp, old, adv, torch.ones(1, 4), epsilon=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.5) / 4)
    assert clip_fraction.item() == pytest.approx(2 / 4)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -0.55, -0.125]]))


def test_clipped_value_loss_by_hand():
    # V = 1.0, V_old = 0.5, R = 2: clipped V = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69
    # V = 0.6, V_old = 0.5, R = 0: inside the range; max(.36, .36) = .36
    values = torch.tensor([[1.0, 0.6]], requires_grad=True)
    loss = ob.clipped_value_loss(values, torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.36) / 2)
    loss.backward()
    # the clipped term wins for token 0 (no gradient through V); token 1: 0.5 * 2 * 0.6 / 2
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.3]]))


def test_leave_one_out_baseline_and_advantage():
    outcomes = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    base = ob.leave_one_out_baseline(outcomes, 3)
    torch.testing.assert_close(base, torch.tensor([0.0, 0.5, 0.5, 0.5, 0.5, 1.0]))
    torch.testing.assert_close(outcomes - base, torch.tensor([1.0, -0.5, -0.5, 0.5, 0.5, -1.0]))


def test_implicit_process_reward_by_hand():
    prm = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0]])
    rewards = ob.implicit_process_rewards(prm, ref, torch.tensor([[1.0, 1.0, 0.0]]), beta=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[0.25, -0.5, 0.0]]))


def test_prime_advantage_by_hand():
    process = torch.tensor([[0.2, -0.1], [0.3, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = ob.prime_advantages(process, mask, torch.tensor([1.0, 0.0]), group_size=2, gamma=1.0)
    # mean process reward per sample: .05 and .3; each one's leave-one-out baseline is the other's
    # centred: [-.1, -.4] and [.25]; returns: [-.5, -.4] and [.25]; outcome advantages +1 and -1
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.6], [-0.75, 0.0]]))
    discounted = ob.prime_advantages(process, mask, torch.tensor([1.0, 0.0]), group_size=2, gamma=0.5)
    torch.testing.assert_close(discounted, torch.tensor([[1 - 0.1 - 0.5 * 0.4, 0.6], [-0.75, 0.0]]))


def test_prm_loss_gradient_by_hand_and_its_direction():
    # Sequence logit = beta * sum_t (prm - ref); dCE/dprm_t = beta * (sigmoid(logit) - y) / sequences.
    prm = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    ref = torch.tensor([[-1.2, -2.1], [-0.5, -0.2]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    beta, outcomes = 0.5, torch.tensor([1.0, 0.0])
    loss = ob.prm_loss(ob.implicit_process_rewards(prm, ref, mask, beta), mask, outcomes)
    logits = [beta * (0.2 + 0.1), beta * 0.0]
    sig = [1 / (1 + math.exp(-x)) for x in logits]
    expected_loss = -(math.log(sig[0]) + math.log(1 - sig[1])) / 2
    assert loss.item() == pytest.approx(expected_loss)
    loss.backward()
    g0, g1 = beta * (sig[0] - 1) / 2, beta * (sig[1] - 0) / 2
    torch.testing.assert_close(prm.grad, torch.tensor([[g0, g0], [g1, 0.0]]))
    # a descent step raises the implicit reward of the correct sample and lowers the wrong one's
    assert g0 < 0 < g1
