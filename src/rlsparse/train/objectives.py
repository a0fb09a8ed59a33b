"""Advantages and losses of the on-policy trainers (PPO, PRIME), as plain tensor functions.

Every function takes per-token tensors of shape (sequences, completion tokens) and a 0/1 ``mask``
of the same shape that is 1 on the tokens a sequence really generated (up to and including its
first EOS). Padded positions never contribute; what a function returns there is 0 unless stated.
The formulas are the textbook ones; docs/train.md gives the references.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (a scalar)."""
    return (values * mask).sum() / mask.sum()


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions (population variance); 0 elsewhere.

    Example:
        >>> whiten(torch.tensor([[1., 2., 3.]]), torch.ones(1, 3))  # mean 2, var 2/3
        tensor([[-1.2247,  0.0000,  1.2247]])
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each sequence's last generated token (its EOS, or its last token if cut off)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).amax(dim=1)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token reward: -kl_coef * (log pi - log pi_ref) at every token, plus the score at the last.

    The KL term is the sampled estimate log(pi/pi_ref) of the token's KL to the reference
    (Ziegler et al. 2019; Ouyang et al. 2022), folded into the reward.

    Args:
        scores: (sequences,) the reward of each whole completion.
        logprobs, ref_logprobs: (sequences, tokens) log-probabilities of the sampled tokens under
            the policy that sampled them and under the frozen reference.
        mask: (sequences, tokens) 1 on generated tokens.
        kl_coef: weight of the KL penalty (0 = none).
    """
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): advantages and returns.

    delta_t = r_t + gamma * V_{t+1} - V_t (V = 0 after the last token),
    A_t = delta_t + gamma * lam * A_{t+1}, returns R_t = A_t + V_t.

    Example:
        >>> adv, ret = gae(torch.tensor([[0., 1.]]), torch.tensor([[.5, .4]]), torch.ones(1, 2), 1.0, 1.0)
        >>> adv  # delta_1 = 1 - .4 = .6; A_0 = (.4 - .5) + .6
        tensor([[0.5000, 0.6000]])
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), averaged over generated tokens.

    loss = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)), rho_t = pi / pi_old.

    Returns:
        (loss, fraction of tokens where the clipped term was the larger one).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    return loss, clip_fraction


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """PPO's clipped value loss: 0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def leave_one_out_baseline(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """For each element, the mean of the other elements of its group (RLOO; Kool et al. 2019).

    ``values`` is 1-D, grouped in consecutive runs of ``group_size`` (the samples of one prompt).

    Example:
        >>> leave_one_out_baseline(torch.tensor([1., 0., 0.]), 3)
        tensor([0.0000, 0.5000, 0.5000])
    """
    grouped = values.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return others.reshape(-1)


def implicit_process_rewards(prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                             beta: float) -> torch.Tensor:
    """PRIME's token-level reward beta * log(pi_prm(y_t | y_<t) / pi_ref(y_t | y_<t)) (Cui et al. 2025, eq. 3)."""
    return beta * (prm_logprobs - ref_logprobs) * mask


def prm_loss(process_rewards: torch.Tensor, mask: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the implicit PRM on outcome labels: the sequence reward sum_t r_t is the logit.

    PRIME trains its implicit PRM as an outcome reward model: sigma(beta * log pi_prm(y)/pi_ref(y))
    predicts the label r_o(y) in [0, 1] (Cui et al. 2025, eq. 2; Yuan et al. 2024).
    """
    logits = (process_rewards * mask).sum(dim=1)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, outcomes.to(logits.dtype))


def prime_advantages(process_rewards: torch.Tensor, mask: torch.Tensor, outcomes: torch.Tensor, group_size: int,
                     gamma: float = 1.0) -> torch.Tensor:
    """PRIME's advantage (Cui et al. 2025, eq. 5): RLOO on process and outcome rewards, returns summed.

    A_t^i = sum_{s>=t} gamma^(s-t) [r_s^i - mean_{j != i} (sum_u r_u^j / |y^j|)] + r_o^i - mean_{j != i} r_o^j.

    Args:
        process_rewards: (sequences, tokens) implicit process rewards (no gradient).
        mask: 1 on generated tokens.
        outcomes: (sequences,) outcome rewards.
        group_size: samples per prompt (consecutive rows), at least 2.
        gamma: discount of the process-reward return.
    """
    lengths = mask.sum(dim=1).clamp(min=1)
    mean_process = (process_rewards * mask).sum(dim=1) / lengths
    centred = (process_rewards - leave_one_out_baseline(mean_process, group_size)[:, None]) * mask
    returns = torch.zeros_like(centred)
    running = torch.zeros_like(centred[:, 0])
    for t in reversed(range(centred.shape[1])):
        running = centred[:, t] + gamma * running
        returns[:, t] = running
    outcome_advantage = outcomes.to(returns.dtype) - leave_one_out_baseline(outcomes.to(returns.dtype), group_size)
    return (returns + outcome_advantage[:, None]) * mask
