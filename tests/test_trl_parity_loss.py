"""rho = 0 on a batch whose prompts repeat is TRL's plain mean over pairs: the same loss and the same gradient.

TRL 1.16 computes the DPO loss inside DPOTrainer._compute_loss, from a model's forward and the trainer's state, and
the reward loss inside RewardTrainer.compute_loss; neither can be called without building a trainer. So the test
takes TRL's formulas as its source writes them (checked below against that source): DPO (loss_type "sigmoid"):
mean over pairs of -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); reward model: mean over pairs of
-logsigmoid(r_c - r_r).
"""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

import common  # noqa: E402
import robust  # noqa: E402
from dro_dpo import dpo_loss  # noqa: E402

BETA = 0.1
PROMPTS = torch.tensor([4, 4, 4, 9, 2, 2, 7])  # N = 7 pairs over 4 prompts, 3 + 1 + 2 + 1 of them
N = len(PROMPTS)


def trl_source(module):
    """The text of a TRL module, read without importing it (importing the trainers takes seconds)."""
    with open(importlib.util.find_spec(module).origin) as f:
        return f.read()


def test_the_formulas_are_trls():
    dpo = trl_source("trl.trainer.dpo_trainer")
    assert "chosen_logratios = chosen_logps - ref_chosen_logps" in dpo
    assert "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)" in dpo
    assert "loss += per_sequence_loss.mean() * loss_weight" in dpo
    reward = trl_source("trl.trainer.reward_trainer")
    assert "loss = -nn.functional.logsigmoid(rewards_chosen - rewards_rejected).mean()" in reward


def dpo_inputs():
    """Summed log-probs of the chosen and rejected responses under the policy (leaves) and the reference."""
    gen = torch.Generator().manual_seed(0)
    policy = [(-30 * torch.rand(N, generator=gen)).requires_grad_() for _ in range(2)]
    reference = [-30 * torch.rand(N, generator=gen) for _ in range(2)]
    return policy, reference


def trl_dpo(policy, reference):
    chosen_logratios = policy[0] - reference[0]
    rejected_logratios = policy[1] - reference[1]
    delta_score = chosen_logratios - rejected_logratios
    return -F.logsigmoid(BETA * delta_score)


def reward_inputs():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(N, generator=gen).requires_grad_() for _ in range(2)], None


def trl_reward(rewards, _):
    return -F.logsigmoid(rewards[0] - rewards[1])


def gamma(n, u=2.0**-24):
    """Higham's gamma_n for float32: |prod of n factors (1 + delta_i)^(+-1) - 1| <= gamma_n when |delta_i| <= u."""
    return n * u / (1 - n * u)


def loss_and_grads(leaves, loss):
    for leaf in leaves:
        leaf.grad = None
    loss.backward()
    return loss.detach(), [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("kind,rho", [(kind, 0.0) for kind in robust.DRO_KINDS] + [("erm", 0.5)])
@pytest.mark.parametrize(
    "inputs,ours,trl",
    [
        (dpo_inputs, lambda p, r: dpo_loss(p[0], p[1], r[0], r[1], BETA), trl_dpo),
        (reward_inputs, trl_reward, trl_reward),
    ],
    ids=["dpo", "reward"],
)
def test_rho_zero_is_trls_plain_mean(kind, rho, inputs, ours, trl):
    leaves, reference = inputs()
    losses = ours(leaves, reference)
    assert torch.equal(losses, trl(leaves, reference))  # dro_dpo's per-pair loss is TRL's, bit for bit
    weights, _ = common.robust_prompt_weights(losses.detach(), PROMPTS, common.DROArgs(kind, rho))
    robust, robust_grads = loss_and_grads(leaves, (weights * losses).sum())
    plain, plain_grads = loss_and_grads(leaves, trl(leaves, reference).mean())

    # The gradient of sum_j w_j l_j with respect to l_j is w_j; that of mean_j l_j is 1/N, computed by autograd in
    # float32. Every weight is exactly that float32 1/N, so the rest of the chain is the same float operations on the
    # same numbers: the gradients are equal bit for bit.
    assert torch.equal(weights, torch.ones(N) / N)
    for a, b in zip(robust_grads, plain_grads):
        assert torch.equal(a, b)
    # The values are the same real number, sum_j l_j / N, rounded differently: w_j = 1/N to 2 roundings (float64,
    # then float32), w_j l_j to 1, and N - 1 additions in any order: gamma_{N+2} of sum_j |l_j| / N; the mean's
    # N - 1 additions and 1 division: gamma_N of the same.
    bound = (gamma(N + 2) + gamma(N)) * losses.detach().abs().sum().item() / N
    assert abs(robust.item() - plain.item()) <= bound


def test_the_old_centre_would_not_be_trls_mean():
    """The check above has teeth: weights uniform over the 4 prompts (1/4 split among each prompt's pairs, the centre
    this code had before) give another gradient on the same batch."""
    leaves, reference = dpo_inputs()
    losses = trl_dpo(leaves, reference)
    _, inverse, counts = torch.unique(PROMPTS, return_inverse=True, return_counts=True)
    uniform_over_prompts = (1 / len(counts) / counts.float())[inverse]
    assert math.isclose(uniform_over_prompts.sum().item(), 1.0, rel_tol=1e-6)
    _, old_grads = loss_and_grads(leaves, (uniform_over_prompts * losses).sum())
    _, plain_grads = loss_and_grads(leaves, trl_dpo(leaves, reference).mean())
    assert not torch.allclose(old_grads[0], plain_grads[0], rtol=1e-2)
