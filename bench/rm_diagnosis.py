"""Where a learned reward model and the gold reward part ways on what a policy samples (issue 24's diagnosis).

For the reference (step 0) and every checkpoint of a dro_ppo.py run (--save-every N --keep-checkpoints large), it
samples responses to an evaluation split's prompts and prints, per domain: the mean gold reward and reward-model
score, their rank correlation (Spearman) over the samples, and the reward model's pair accuracy on *on-policy pairs*
(two samples of the same prompt whose gold rewards differ: does the reward model order them as the gold reward
does?), with scores relative to the prompt's chosen response as dro_ppo.py's --score-baseline chosen uses them; then
the samples the reward model overrates most (high score, low gold), which is what PPO learns to exploit.

    python dro_reward.py --output-dir runs/rm
    python dro_ppo.py --reward-model-path runs/rm/model --output-dir runs/ppo_rm --save-every 10 --keep-checkpoints 100
    python bench/rm_diagnosis.py --reward-model runs/rm/model --ppo-run runs/ppo_rm
"""

import argparse
import glob
import os
import statistics
import sys

import torch
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dro_ppo  # noqa: E402


def samples(policy, tokenizer, data, reward_model, k, max_new_tokens, seed):
    """k sampled responses per prompt: (prompt index, text, gold, reward-model score)."""
    torch.manual_seed(seed)
    config = common.sampling_config(tokenizer, max_new_tokens, 1.0, model=policy)
    end_ids = common.end_token_ids(tokenizer, policy)
    out = []
    for _ in range(k):
        for i in range(0, len(data["ids"]), 200):
            idx = list(range(i, min(i + 200, len(data["ids"]))))
            _, _, responses, response_mask, ended = common.generate(
                policy, [data["ids"][j] for j in idx], tokenizer.pad_token_id, end_ids, config
            )
            rollouts = (
                [data["text"][j] for j in idx],
                [data["domain"][j] for j in idx],
                [data["chat"][j] for j in idx],
                responses,
                response_mask,
                ended.tolist(),
            )
            gold = dro_ppo.rollout_scores(tokenizer, None, *rollouts).tolist()
            rm = (dro_ppo.rollout_scores(tokenizer, reward_model, *rollouts) - data["baseline"][idx]).tolist()
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            out += [(j, t, g, r) for j, t, g, r in zip(idx, texts, gold, rm)]
    return out


def report(name, rows, data, top):
    print(f"\n## {name}")
    print("| domain | mean gold | mean RM score | Spearman(RM, gold) | on-policy pair accuracy (pairs) |")
    print("|---|---|---|---|---|")
    for domain in sorted(set(data["domain"])) + ["all"]:
        mine = [r for r in rows if domain == "all" or data["domain"][r[0]] == domain]
        gold, rm = [r[2] for r in mine], [r[3] for r in mine]
        rho = spearmanr(rm, gold).statistic if len(set(gold)) > 1 else float("nan")
        by_prompt = {}
        for j, _, g, r in mine:
            by_prompt.setdefault(j, []).append((g, r))
        right = total = 0
        for pairs in by_prompt.values():
            for a in range(len(pairs)):
                for b in range(a + 1, len(pairs)):
                    (ga, ra), (gb, rb) = pairs[a], pairs[b]
                    if ga != gb:
                        total += 1
                        right += (ra > rb) == (ga > gb)
        accuracy = f"{100 * right / total:.1f} ({total})" if total else "- (0)"
        print(f"| {domain} | {100 * statistics.mean(gold):.1f} | {statistics.mean(rm):.2f} | {rho:.2f} | {accuracy} |")
    rm_all = [r[3] for r in rows]
    mu, sd = statistics.mean(rm_all), statistics.pstdev(rm_all) or 1.0
    worst = sorted(rows, key=lambda r: (r[3] - mu) / sd - 2 * r[2], reverse=True)[:top]
    print(f"\nmost overrated (reward-model z-score high, gold low), {top}:")
    for j, text, g, r in worst:
        print(f"  {data['text'][j].strip()!r:28} -> {text!r:14} gold {g:.2f}  RM {r:+.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward-model", required=True, help="a dro_reward.py model folder")
    parser.add_argument("--ppo-run", required=True, help="a dro_ppo.py run folder with checkpoints")
    parser.add_argument("--split", default="test_uniform")
    parser.add_argument("--rows", type=int, default=400, help="prompts of the split")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--top", type=int, default=12, help="overrated samples listed per checkpoint")
    parser.add_argument("--score-baseline", default="chosen", choices=["chosen", "none"], help="as dro_ppo.py's")
    parser.add_argument("--every", type=int, default=1, help="use every n-th checkpoint")
    a = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    tokenizer = AutoTokenizer.from_pretrained(a.reward_model)
    reward_model = AutoModelForSequenceClassification.from_pretrained(a.reward_model).eval()
    data = dro_ppo.load_prompts("synthetic", a.split, tokenizer, 64, max_rows=a.rows)
    data["baseline"] = dro_ppo.score_baselines(reward_model, data, tokenizer.pad_token_id, a.score_baseline)
    policy = AutoModelForCausalLM.from_config(common.tiny_config(tokenizer)).eval()
    policy.config.pad_token_id = tokenizer.pad_token_id
    checkpoints = sorted(glob.glob(os.path.join(a.ppo_run, "checkpoints", "step-*[0-9]")))
    if not checkpoints:
        raise SystemExit(f"{a.ppo_run}: no checkpoints (run dro_ppo.py with --save-every N --keep-checkpoints M)")
    first = torch.load(os.path.join(checkpoints[0], "state.pt"), weights_only=False)
    todo = [("step 0 (the reference)", first["modules"]["reference"])]
    for path in checkpoints[a.every - 1 :: a.every]:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
        todo.append((f"step {state['step']}", state["modules"]["policy"]))
    with torch.no_grad():
        for name, weights in todo:
            policy.load_state_dict(weights)
            report(name, samples(policy, tokenizer, data, reward_model, a.samples, a.max_new_tokens, 0), data, a.top)


if __name__ == "__main__":
    main()
