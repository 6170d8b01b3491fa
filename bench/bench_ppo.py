"""Cost of the robust weighting in dro_ppo.py: robust / ERM time of one PPO iteration (rollout + update).

    OMP_NUM_THREADS=1 python bench/bench_ppo.py                     # tiny model, dro_ppo.py's default sizes
    OMP_NUM_THREADS=1 python bench/bench_ppo.py --kind tv --rho 0.2 --iterations 20

Two identical setups (policy, reference, value model, optimizer; same initialisation) run PPO iterations
alternately, ERM then robust, in one process, so that machine load affects both alike. An iteration is the
body of dro_ppo.py's training loop on one process, step by step, at the script's defaults (`dro_ppo.Args`):
`common.generate` (sampling, cut at the end token), the policy and reference log-probs (`common.token_logprobs`),
the entropy, the values, the gold scores (`dro_ppo.rollout_scores`) minus the missing-EOS penalty, the k3 KL
penalty, GAE, the whitening, the worst-case prompt weights (`robust.robust_prompt_weights`; ERM: uniform), then
the PPO epochs over minibatches with both gradient clips and the finiteness checks. Only the logging is left
out. The policy is not warm-started (a random tiny Llama). Prints the median time of each part and the
robust/ERM ratio of the whole iteration (target <= 1.02).
"""

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402

import common  # noqa: E402
import dro_ppo  # noqa: E402
import lifecycle  # noqa: E402
import robust  # noqa: E402
from dro_ppo import cross_fitted_weights, gae, masked_mean, masked_whiten, ppo_loss, rollout_scores  # noqa: E402

DEVICE = torch.device("cpu")


def make_setup(seed, tok, args):
    """Policy, reference, value model and optimizer, built as dro_ppo.py builds them (without the warm start)."""
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(common.tiny_config(tok))
    policy.config.pad_token_id = tok.pad_token_id
    policy.eval()  # no dropout anywhere: the PPO ratio must compare the same function
    reference = copy.deepcopy(policy).requires_grad_(False)
    critic = dro_ppo.Critic(policy)
    optimizer = torch.optim.AdamW(
        [
            {"params": policy.parameters(), "lr": args.learning_rate},
            {"params": critic.parameters(), "lr": args.value_learning_rate},
        ],
        fused=True,
    )
    return {"policy": policy, "reference": reference, "critic": critic, "optimizer": optimizer}


def iteration(s, train, mine, args, tok, generation_config):
    """One PPO iteration of dro_ppo.py on the prompts `mine` (world size 1); returns (rollout seconds, weights
    seconds, update seconds)."""
    policy, reference, critic, optimizer = s["policy"], s["reference"], s["critic"], s["optimizer"]
    pad_id, end_ids, world = tok.pad_token_id, common.end_token_ids(tok, policy), 1
    rollout_prompts = [i for i in mine for _ in range(args.samples_per_prompt)]
    prompt_ids = torch.arange(len(mine), device=DEVICE).repeat_interleave(args.samples_per_prompt)

    # 1. Rollouts, scores, per-token rewards (KL penalty + score at the last response token), GAE
    t0 = time.perf_counter()
    with torch.no_grad(), lifecycle.autocast(args, DEVICE):
        ids, mask, responses, response_mask, ended = common.generate(
            policy, [train["ids"][i] for i in rollout_prompts], pad_id, end_ids, generation_config
        )
        context_len = ids.shape[1] - responses.shape[1]
        logprobs, entropy = common.token_logprobs(policy, ids, mask, context_len, args.temperature, entropy=True)
        ref_logprobs = common.token_logprobs(reference, ids, mask, context_len, args.temperature)
        entropy = masked_mean(entropy, response_mask)  # noqa: F841 (logged by the script)
        values = critic(ids, mask)[:, context_len - 1 : -1]
        scores = rollout_scores(
            tok,
            None,
            [train["text"][i] for i in rollout_prompts],
            [train["domain"][i] for i in rollout_prompts],
            [train["chat"][i] for i in rollout_prompts],
            responses,
            response_mask,
        )
        scores = scores - args.missing_eos_penalty * (~ended).float()
        kl = common.kl_k3(logprobs, ref_logprobs) * response_mask
        rewards = -args.kl_coef * kl
        rewards[torch.arange(len(rewards)), response_mask.sum(1) - 1] += scores
        advantages, returns = gae(rewards, values, response_mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, response_mask)
        t1 = time.perf_counter()

        # 2. The worst-case prompt weights (ROBUST), fixed for all PPO epochs on this batch
        prompt_values = values[:, 0] if args.weights_from == "values" else rewards.sum(1)
        if args.weights_from == "loo":
            weights, _ = cross_fitted_weights(-prompt_values, prompt_ids, args.dro, args.samples_per_prompt)
        else:
            weights, _ = robust.robust_prompt_weights(-prompt_values, prompt_ids, args.dro)
    t2 = time.perf_counter()

    # 3. PPO epochs over minibatches, weights scaled by N / M (and the world size); train() as in dro_ppo.py
    policy.train(), critic.train()
    for _epoch in range(args.num_ppo_epochs):
        for mb in torch.randperm(args.local_batch_size, device=DEVICE).split(args.minibatch_size):
            with lifecycle.autocast(args, DEVICE):
                new_logprobs = common.token_logprobs(policy, ids[mb], mask[mb], context_len, args.temperature)
                new_values = critic(ids[mb], mask[mb])[:, context_len - 1 : -1]
            pg_loss, vf_loss, _ = ppo_loss(
                new_logprobs,
                logprobs[mb],
                advantages[mb],
                new_values,
                values[mb],
                returns[mb],
                response_mask[mb],
                weights[mb] * world * args.local_batch_size / len(mb),
                args.cliprange,
                args.cliprange_value,
                args.max_new_tokens,
            )
            loss = pg_loss + args.vf_coef * vf_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            value_grad_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            if torch.isfinite(grad_norm) and torch.isfinite(value_grad_norm):
                optimizer.step()
            else:
                raise FloatingPointError("the gradient norm is not finite")
    policy.eval(), critic.eval()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


if __name__ == "__main__":
    defaults = dro_ppo.Args()
    p = argparse.ArgumentParser()
    p.add_argument("--kind", default=defaults.dro.kind)
    p.add_argument("--rho", type=float, default=defaults.dro.rho)
    p.add_argument("--iterations", type=int, default=12, help="timed iterations per setting (after 2 warm-up ones)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="prompts per rollout batch")
    p.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt)
    p.add_argument("--num-ppo-epochs", type=int, default=defaults.num_ppo_epochs)
    p.add_argument("--num-minibatches", type=int, default=defaults.num_minibatches)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--weights-from", choices=["returns", "values", "loo"], default=defaults.weights_from)
    a = p.parse_args()
    base = dataclasses.replace(
        defaults,
        batch_size=a.batch_size,
        samples_per_prompt=a.samples_per_prompt,
        num_ppo_epochs=a.num_ppo_epochs,
        num_minibatches=a.num_minibatches,
        max_new_tokens=a.max_new_tokens,
        weights_from=a.weights_from,
    )
    base.local_batch_size = base.batch_size * base.samples_per_prompt
    if base.local_batch_size % base.num_minibatches:
        sys.exit(
            f"rollouts per batch {base.local_batch_size} must be divisible by --num-minibatches {base.num_minibatches}"
        )
    base.minibatch_size = base.local_batch_size // base.num_minibatches
    settings = {
        "erm": dataclasses.replace(base, dro=robust.DROArgs(kind="erm", rho=0.0)),
        "robust": dataclasses.replace(base, dro=robust.DROArgs(kind=a.kind, rho=a.rho)),
    }

    tok = common.tiny_tokenizer()
    train = dro_ppo.load_prompts("synthetic", "train", tok, base.max_prompt_length, max_rows=2000)
    batches = common.batch_indices(len(train["ids"]), base.batch_size, base.seed, "prompts")
    generation_config = GenerationConfig(
        max_new_tokens=base.max_new_tokens,
        do_sample=True,
        temperature=base.temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=common.end_token_ids(tok),  # (the tiny model's generation config adds none)
    )
    setups = {name: make_setup(0, tok, args) for name, args in settings.items()}
    times = {name: [] for name in settings}
    for it in range(a.iterations + 2):
        mine = next(batches)
        for name in settings if it % 2 == 0 else list(settings)[::-1]:  # alternate the order, too
            torch.manual_seed(it)  # the same sampling randomness for both
            t = iteration(setups[name], train, mine, settings[name], tok, generation_config)
            if it >= 2:
                times[name].append(t)
    print(
        f"one PPO iteration, {base.batch_size} prompts x {base.samples_per_prompt} samples, "
        f"{base.num_ppo_epochs} epochs x "
        f"{base.num_minibatches} minibatches, weights from {base.weights_from}, median of {a.iterations} "
        f"(threads: {torch.get_num_threads()})"
    )
    print(f"{'setting':<24}{'rollout s':>11}{'weights ms':>12}{'update s':>10}{'total s':>9}{'rollout %':>11}")
    total = {}
    for name, ts in times.items():
        gen, w, upd = (statistics.median(x[i] for x in ts) for i in range(3))
        total[name] = statistics.median(sum(x) for x in ts)
        label = "erm" if name == "erm" else f"{a.kind} rho={a.rho}"
        print(
            f"{label:<24}{gen:>11.3f}{1000 * w:>12.2f}{upd:>10.3f}{total[name]:>9.3f}{100 * gen / total[name]:>10.0f}%"
        )
    ratios = [sum(r) / sum(e) for r, e in zip(times["robust"], times["erm"])]
    print(
        f"robust / ERM iteration time: {total['robust'] / total['erm']:.3f} (ratio of medians); "
        f"median of paired ratios {statistics.median(ratios):.3f}; target <= 1.02"
    )
