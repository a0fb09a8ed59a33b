"""PPO and PRIME trainers: whole updates on a tiny model against straightforward reference code.

The trainers sample their rollouts; the tests capture each rollout (the token ids) and redo
everything else by hand: log-probabilities by a plain log_softmax + index, rewards, GAE and
whitening with Python loops, the clipped losses, gradient clipping and AdamW steps.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from trainhelpers import assert_masked_training, make_model, make_tokenizer, params_of, random_mask
from rlsparse.errors import UsageError
from rlsparse.train.trainers import algorithm, build_trainer

PROMPTS = ["w1 w2 w3", "w4 w5", "what is 1 plus 2", "w9 w10 w11"]


def _reward(completions, **kwargs):
    # in [0, 1] (PRIME's outcome labels) and different between most samples (a learning signal)
    return [min(1.0, len(str(c)) / 20) for c in completions]


def _build(tmp_path, name, model, mask=None, optim="adamw_torch", ref_model=None, **options):
    from datasets import Dataset

    _, config_cls = algorithm(name).classes()
    config = config_cls(output_dir=str(tmp_path / name), per_device_train_batch_size=2, num_generations=2,
                        max_completion_length=4, report_to="none", save_strategy="no", use_cpu=True,
                        disable_tqdm=True, seed=0, lr_scheduler_type="constant", optim=optim,
                        learning_rate=1e-2, weight_decay=0.0, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(name, model, config, Dataset.from_dict({"prompt": PROMPTS, "answer": ["3"] * 4}),
                                make_tokenizer(), mask=mask, reward_funcs=[_reward], verify=mask is not None,
                                ref_model=ref_model)
    rollouts = []
    generate = trainer._generate

    def capture(model, rows):
        batch = generate(model, rows)
        rollouts.append({k: v.clone() for k, v in batch.items()})
        return batch

    trainer._generate = capture
    return trainer, rollouts


def _positions(attention):
    return (attention.long().cumsum(-1) - 1).clamp(min=0)


def _logprobs(model, ids, attention, n):
    """log pi(token) for each of the last n tokens: full log_softmax, then one index per token."""
    logits = model(input_ids=ids, attention_mask=attention, position_ids=_positions(attention)).logits.float()
    logp = logits.log_softmax(-1)
    width = ids.shape[1]
    rows = [torch.stack([logp[i, width - n + t - 1, ids[i, width - n + t]] for t in range(n)])
            for i in range(ids.shape[0])]
    return torch.stack(rows)


def _lengths(rollout):
    return [int(m.sum()) for m in rollout["mask"]]


def _scores(rollout):
    tok = make_tokenizer()
    n = rollout["mask"].shape[1]
    texts = [tok.decode(ids[-n:][:length], skip_special_tokens=True)
             for ids, length in zip(rollout["input_ids"], _lengths(rollout))]
    return _reward(texts)


def _step(params, optimizer, loss, max_norm):
    optimizer.zero_grad()
    loss.backward()
    if max_norm:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


# Without clipping, a wrongly scaled advantage or loss changes the update; with it, clipping is checked.
@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_ppo_update_matches_a_straightforward_reference(tmp_path, max_norm):
    gamma, lam, kl_coef, eps, eps_v = 0.9, 0.8, 0.1, 0.2, 0.2
    model = make_model()
    policy = copy.deepcopy(model)
    # a reference unlike the policy, so that the KL penalty is not zero on the first rollout
    reference = make_model(seed=1)
    # one rollout, two epochs over it in a single minibatch: two policy and two value steps
    # SGD, so that a wrongly scaled advantage or loss cannot hide behind Adam's normalisation
    trainer, rollouts = _build(tmp_path, "ppo", model, optim="sgd", max_steps=2, num_ppo_epochs=2, num_mini_batches=1,
                               ref_model=copy.deepcopy(reference),
                               gamma=gamma, lam=lam, kl_coef=kl_coef, epsilon=eps, cliprange_value=eps_v,
                               max_grad_norm=max_norm)
    critic = copy.deepcopy(trainer.value_model)
    trainer.train()
    assert len(rollouts) == 1
    r = rollouts[0]
    ids, attention, n = r["input_ids"], r["attention_mask"], r["mask"].shape[1]
    lengths, scores = _lengths(r), _scores(r)

    def values_of(critic_model):
        hidden = critic_model.backbone(input_ids=ids, attention_mask=attention,
                                       position_ids=_positions(attention)).last_hidden_state
        return critic_model.head(hidden).squeeze(-1)[:, -n - 1:-1].float()

    with torch.no_grad():
        old_logp = _logprobs(policy, ids, attention, n)
        ref_logp = _logprobs(reference, ids, attention, n)
        old_values = values_of(critic)
    # Rewards, GAE and returns, one sequence and one token at a time.
    adv = [[0.0] * n for _ in lengths]
    ret = [[0.0] * n for _ in lengths]
    for i, length in enumerate(lengths):
        rewards = [-kl_coef * (old_logp[i, t].item() - ref_logp[i, t].item()) for t in range(length)]
        rewards[-1] += scores[i]
        running = 0.0
        for t in reversed(range(length)):
            next_value = old_values[i, t + 1].item() if t + 1 < length else 0.0
            delta = rewards[t] + gamma * next_value - old_values[i, t].item()
            running = delta + gamma * lam * running
            adv[i][t] = running
            ret[i][t] = running + old_values[i, t].item()
    valid = [(i, t) for i, length in enumerate(lengths) for t in range(length)]
    flat = [adv[i][t] for i, t in valid]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / len(flat) + 1e-8)
    whitened = {(i, t): (adv[i][t] - mean) / std for i, t in valid}

    policy_opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=1e-2)
    for _epoch in range(2):
        logp = _logprobs(policy, ids, attention, n)
        terms = []
        for i, t in valid:
            ratio = torch.exp(logp[i, t] - old_logp[i, t])
            a = whitened[(i, t)]
            terms.append(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps, 1 + eps)))
        _step(list(policy.parameters()), policy_opt, torch.stack(terms).mean(), max_norm)
        v = values_of(critic)
        terms = []
        for i, t in valid:
            clipped = old_values[i, t] + torch.clamp(v[i, t] - old_values[i, t], -eps_v, eps_v)
            terms.append(0.5 * torch.maximum((v[i, t] - ret[i][t]) ** 2, (clipped - ret[i][t]) ** 2))
        _step(list(critic.parameters()), critic_opt, torch.stack(terms).mean(), max_norm)

    moved = 0
    for (name, ours), (_, theirs) in zip(model.named_parameters(), policy.named_parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=name)
        moved += int((theirs != make_model().get_parameter(name)).sum())
    assert moved > 0
    for (name, ours), (_, theirs) in zip(trainer.value_model.named_parameters(), critic.named_parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_prime_update_matches_a_straightforward_reference(tmp_path, max_norm):
    beta, eps, prm_lr = 0.5, 0.2, 0.5
    model = make_model()
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    prm = copy.deepcopy(model)
    # two rollouts, one update each: the second rollout's process rewards come from the updated PRM
    trainer, rollouts = _build(tmp_path, "prime", model, optim="sgd", max_steps=2, prm_beta=beta, epsilon=eps,
                               prm_learning_rate=prm_lr, max_grad_norm=max_norm)
    trainer.train()
    assert len(rollouts) == 2
    policy_opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
    prm_opt = torch.optim.SGD(prm.parameters(), lr=prm_lr)
    for r in rollouts:
        ids, attention, n = r["input_ids"], r["attention_mask"], r["mask"].shape[1]
        lengths, outcomes = _lengths(r), _scores(r)
        with torch.no_grad():
            old_logp = _logprobs(policy, ids, attention, n)
            ref_logp = _logprobs(reference, ids, attention, n)
        prm_logp = _logprobs(prm, ids, attention, n)
        process = [[beta * (prm_logp[i, t] - ref_logp[i, t]) for t in range(length)]
                   for i, length in enumerate(lengths)]
        ce = [torch.nn.functional.binary_cross_entropy_with_logits(torch.stack(p).sum(), torch.tensor(y))
              for p, y in zip(process, outcomes)]
        _step(list(prm.parameters()), prm_opt, torch.stack(ce).mean(), max_norm)
        process = [[x.item() for x in p] for p in process]
        means = [sum(p) / len(p) for p in process]
        advantages = {}
        for i, length in enumerate(lengths):
            other = i ^ 1  # two samples per prompt, consecutive
            to_go = 0.0
            for t in reversed(range(length)):
                to_go += process[i][t] - means[other]
                advantages[(i, t)] = to_go + outcomes[i] - outcomes[other]
        logp = _logprobs(policy, ids, attention, n)
        terms = []
        for (i, t), a in advantages.items():
            ratio = torch.exp(logp[i, t] - old_logp[i, t])
            terms.append(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps, 1 + eps)))
        _step(list(policy.parameters()), policy_opt, torch.stack(terms).mean(), max_norm)
    for (name, ours), (_, theirs) in zip(model.named_parameters(), policy.named_parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=name)
    for (name, ours), (_, theirs) in zip(trainer.prm.named_parameters(), prm.named_parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", ["ppo", "prime"])
def test_only_the_policy_is_masked_and_masked_out_weights_are_bit_identical(tmp_path, name):
    model = make_model()
    mask = random_mask(model)
    before = params_of(model)
    trainer, _ = _build(tmp_path, name, model, mask, max_steps=3, num_ppo_epochs=3, max_grad_norm=1.0)
    helper = trainer.value_model if name == "ppo" else trainer.prm
    helper_before = params_of(helper)
    trainer.train()
    assert_masked_training(before, model, mask)
    # the value model / PRM trains densely on its own optimizer: the mask is the policy's alone
    assert all(not torch.equal(helper_before[n], p) for n, p in helper.named_parameters() if n.endswith("q_proj.weight"))


def test_prime_refuses_outcome_rewards_outside_zero_one(tmp_path):
    from datasets import Dataset

    from rlsparse.train.prime import PRIMEConfig

    config = PRIMEConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                         max_completion_length=2, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = build_trainer("prime", make_model(), config, Dataset.from_dict({"prompt": PROMPTS}), make_tokenizer(),
                            reward_funcs=[lambda completions, **kw: [2.0] * len(completions)])
    with pytest.raises(UsageError, match=r"outcome rewards must lie in \[0, 1\]"):
        trainer.train()


def test_config_errors_are_caught_when_the_config_is_built(tmp_path):
    from rlsparse.train.ppo import PPOConfig
    from rlsparse.train.prime import PRIMEConfig

    with pytest.raises(ValueError, match="equal minibatches"):
        PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, num_mini_batches=2, use_cpu=True)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        PRIMEConfig(output_dir=str(tmp_path), num_generations=1, use_cpu=True)
