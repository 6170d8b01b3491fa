"""Tests of the cheaper PPO step: the RLOO baseline (--baseline rloo), the shared-base LoRA critic, and that the
critic path with rho = 0 is still plain PPO bit for bit."""

import json
import os

import pytest
import torch
from test_ppo import make_rollout_batch, run_script

import dro_ppo


@pytest.mark.parametrize("k", [2, 3, 5])
def test_rloo_advantages_match_a_direct_computation(k):
    returns = torch.randn(7 * k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    adv = dro_ppo.rloo_advantages(returns, k)
    for i in range(7):
        for j in range(k):
            others = [returns[i * k + m].item() for m in range(k) if m != j]
            assert adv[i * k + j].item() == pytest.approx(returns[i * k + j].item() - sum(others) / (k - 1), abs=1e-12)
    assert adv.view(-1, k).sum(1).abs().max() < 1e-12  # the K advantages of a prompt sum to zero
    shifted = returns.clone()
    shifted[:k] += 3.0  # a constant added to one prompt's returns leaves its advantages unchanged
    torch.testing.assert_close(dro_ppo.rloo_advantages(shifted, k), adv)


def test_ppo_loss_without_values_is_the_policy_loss_alone():
    b = make_rollout_batch(seed=11)
    logprobs = b["old_logprobs"] + 0.1 * torch.randn_like(b["old_logprobs"])
    args = (logprobs, b["old_logprobs"], b["advantages"])
    pg, vf, stats = dro_ppo.ppo_loss(*args, b["old_values"] + 0.3, b["old_values"], b["returns"], b["mask"])
    pg_none, vf_none, stats_none = dro_ppo.ppo_loss(*args, None, None, None, b["mask"])
    assert torch.equal(pg, pg_none) and vf_none.item() == 0.0 and vf.item() > 0
    assert "losses/value_clipfrac" in stats and "losses/value_clipfrac" not in stats_none


def test_script_with_rloo_baseline(tmp_path):
    """--baseline rloo (the default) trains without a value model: no critic in the checkpointed modules, a finite
    policy loss, value loss 0, and the usual evaluation rows."""
    out = tmp_path / "rloo"
    proc = run_script(out, "--max-eval-rows", "8", "--samples-per-prompt", "4")
    assert "--baseline rloo" in proc.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert {r["step"] for r in rows} == {0, 2} and all("gold_reward" in r for r in rows)
    assert os.path.exists(out / "model" / "config.json")


def test_rloo_needs_several_samples_and_no_value_weights():
    for bad in (dict(samples_per_prompt=1, weights_from="returns"), dict(weights_from="values")):
        with pytest.raises(ValueError, match="--baseline rloo"):
            dro_ppo.Args(baseline="rloo", **bad)
