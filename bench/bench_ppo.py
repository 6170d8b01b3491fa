"""Cost of the robust weighting in dro_ppo.py: robust / ERM time of one PPO iteration (rollout + update).

    OMP_NUM_THREADS=1 python bench/bench_ppo.py                     # tiny model, default batch sizes
    OMP_NUM_THREADS=1 python bench/bench_ppo.py --kind tv --rho 0.2 --iterations 20

Two identical setups (policy, reference, value model, optimizer; same initialisation) run PPO iterations
alternately, ERM then robust, in one process, so that machine load affects both alike. An iteration is
what dro_ppo.py does per update: sampling with `generate`, the policy/reference/value forwards, scores,
KL penalty, GAE, the worst-case weights (ERM: uniform), then the PPO epochs over minibatches. Prints the
median time of each part and the robust/ERM ratio of the whole iteration (target <= 1.02).
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dro_ppo  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402


def make_setup(seed, tok):
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(common.tiny_config(tok))
    critic = dro_ppo.Critic(policy)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=1e-4)
    return {"policy": policy, "ref": copy.deepcopy(policy).requires_grad_(False), "critic": critic, "opt": opt}


def iteration(s, prompts, texts, dro, a, tok, gen_config):
    """One PPO iteration of dro_ppo.py; returns (rollout seconds, weights seconds, update seconds)."""
    policy, ref, critic = s["policy"], s["ref"], s["critic"]
    t0 = time.perf_counter()
    with torch.no_grad():
        queries = common.pad(prompts, tok.pad_token_id, side="left")
        lengths = torch.tensor([len(p) for p in prompts])
        qmask = (torch.arange(queries.shape[1])[None] >= queries.shape[1] - lengths[:, None]).long()
        out = policy.generate(input_ids=queries, attention_mask=qmask, generation_config=gen_config)
        responses = torch.nn.functional.pad(out[:, queries.shape[1]:], (0, a.max_new_tokens - out.shape[1] + queries.shape[1]))
        responses, rmask, has_eos = dro_ppo.cut_at_eos(responses, tok.eos_token_id, tok.pad_token_id)
        ids, mask, ctx = torch.cat([queries, responses], 1), torch.cat([qmask, rmask], 1), queries.shape[1]
        logprobs = dro_ppo.token_logprobs(dro_ppo.token_logits(policy, ids, mask, ctx, 1.0), responses)
        ref_logprobs = dro_ppo.token_logprobs(dro_ppo.token_logits(ref, ids, mask, ctx, 1.0), responses)
        values = critic(ids, mask)[:, ctx - 1: -1]
        decoded = tok.batch_decode(responses, skip_special_tokens=True)
        scores = torch.tensor([common.synthetic_gold_reward(p, t) for p, t in zip(texts, decoded)]) - (~has_eos).float()
        rewards = -0.05 * dro_ppo.kl_penalty(logprobs, ref_logprobs) * rmask
        rewards[torch.arange(len(rewards)), dro_ppo.last_index(rmask)] += scores
        adv, returns = dro_ppo.gae(rewards, values, rmask, 1.0, 0.95)
        adv = dro_ppo.masked_whiten(adv, rmask)
        t1 = time.perf_counter()
        groups = torch.arange(len(prompts) // a.samples_per_prompt).repeat_interleave(a.samples_per_prompt)
        weights, _ = common.robust_pair_weights(-rewards.sum(1), groups, dro)
    t2 = time.perf_counter()
    n, mb_size = len(prompts), len(prompts) // a.num_minibatches
    for _ in range(a.num_ppo_epochs):
        for mb in torch.randperm(n).split(mb_size):
            new_lp = dro_ppo.token_logprobs(dro_ppo.token_logits(policy, ids[mb], mask[mb], ctx, 1.0), responses[mb])
            new_v = critic(ids[mb], mask[mb])[:, ctx - 1: -1]
            pg, vf, _ = dro_ppo.ppo_loss(new_lp, logprobs[mb], adv[mb], new_v, values[mb], returns[mb], rmask[mb],
                                         weights[mb] * n / len(mb))
            s["opt"].zero_grad(set_to_none=True)
            (pg + 0.1 * vf).backward()
            torch.nn.utils.clip_grad_norm_(list(policy.parameters()) + list(critic.parameters()), 1.0)
            s["opt"].step()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--kind", default="chi2")
    p.add_argument("--rho", type=float, default=0.5)
    p.add_argument("--iterations", type=int, default=12, help="timed iterations per setting (after 2 warm-up ones)")
    p.add_argument("--rollout-prompts", type=int, default=64)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--num-ppo-epochs", type=int, default=4)
    p.add_argument("--num-minibatches", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args()
    tok = common.tiny_tokenizer()
    rows = common.load_preferences("synthetic", "train", tok, max_rows=2000)
    gen_config = GenerationConfig(max_new_tokens=a.max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    settings = {"erm": common.DROArgs(kind="erm", rho=0.0), "robust": common.DROArgs(kind=a.kind, rho=a.rho)}
    setups = {name: make_setup(0, tok) for name in settings}
    times = {name: [] for name in settings}
    for it in range(a.iterations + 2):
        start = it * a.rollout_prompts % (len(rows) - a.rollout_prompts)
        batch = [rows[i] for i in range(start, start + a.rollout_prompts) for _ in range(a.samples_per_prompt)]
        prompts = [tok(r["prompt"], add_special_tokens=False).input_ids for r in batch]
        for name in (settings if it % 2 == 0 else list(settings)[::-1]):  # alternate the order, too
            torch.manual_seed(it)  # the same sampling randomness for both
            t = iteration(setups[name], prompts, [r["prompt"] for r in batch], settings[name], a, tok, gen_config)
            if it >= 2:
                times[name].append(t)
    print(f"one PPO iteration, {a.rollout_prompts} prompts x {a.samples_per_prompt} samples, {a.num_ppo_epochs} epochs x "
          f"{a.num_minibatches} minibatches, median of {a.iterations} (threads: {torch.get_num_threads()})")
    print(f"{'setting':<24}{'rollout s':>11}{'weights ms':>12}{'update s':>10}{'total s':>9}{'rollout %':>11}")
    total = {}
    for name, ts in times.items():
        gen, w, upd = (statistics.median(x[i] for x in ts) for i in range(3))
        total[name] = statistics.median(sum(x) for x in ts)
        label = "erm" if name == "erm" else f"{a.kind} rho={a.rho}"
        print(f"{label:<24}{gen:>11.3f}{1000 * w:>12.2f}{upd:>10.3f}{total[name]:>9.3f}{100 * gen / total[name]:>10.0f}%")
    ratios = [sum(r) / sum(e) for r, e in zip(times["robust"], times["erm"])]
    print(f"robust / ERM iteration time: {total['robust'] / total['erm']:.3f} (ratio of medians); "
          f"median of paired ratios {statistics.median(ratios):.3f}; target <= 1.02")
