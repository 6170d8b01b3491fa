"""Reward-model data from the warm-started policy's own samples, labelled by the gold reward (InstructGPT's recipe on
the embedded task; issue 24's search for a reward model that PPO can climb).

Warm-starts the tiny policy exactly as `dro_ppo.py` does (same data, steps, learning rate and seed offset), saves it
(a reward model can start from it: `dro_reward.py --model-name-or-path <out>/sft`), samples K responses to each
`synthetic` training prompt and writes three preference files (JSONL, {prompt, chosen, rejected, domain}), each pair
kept only where the two gold rewards differ:

- `samples.jsonl`: the best against the worst of the K samples;
- `demo.jsonl`: those pairs, plus the prompt's demonstration (`synthetic`'s chosen response) against one sample;
- `mix.jsonl`: `demo.jsonl` plus `synthetic-samples`' training pairs (off-policy answers: other tasks', shuffled);
- with `--policy <ppo run>/model --previous <last round's file>`, iterated RLHF's next round (Bai et al. 2022):
  `next.jsonl`, the last round's pairs plus `demo.jsonl`'s from the policy PPO trained, so that what it found is
  labelled by the gold reward.

    python bench/policy_pairs.py --seed 1 --out runs/policy_pairs_s1
    python dro_reward.py --dataset runs/policy_pairs_s1/demo.jsonl --model-name-or-path runs/policy_pairs_s1/sft \
        --dro.kind erm --total-steps 1500 --output-dir runs/rm_demo
"""

import argparse
import json
import os
import random
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dro_ppo  # noqa: E402
import ingest  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (K)")
    p.add_argument("--sft-steps", type=int, default=1000, help="as dro_ppo.py's default")
    p.add_argument("--max-rows", type=int, help="use only this many prompts (a quick look, or a test)")
    p.add_argument("--split", default="train", help="whose prompts: validation gives held-out pairs")
    p.add_argument("--policy", help="sample from this saved policy (e.g. a dro_ppo.py run's model), not a warm start")
    p.add_argument("--previous", help="the previous round's pairs: also write next.jsonl, them plus demo.jsonl's")
    a = p.parse_args()
    if a.split != "train" and not a.policy:
        p.error("the warm start learns the training split: pass --policy (e.g. <out>/sft) with --split")
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    ppo = dro_ppo.Args()  # its defaults: the warm start and the rollouts as dro_ppo.py runs them
    tokenizer = common.tiny_tokenizer()
    data = dro_ppo.load_prompts("synthetic", a.split, tokenizer, ppo.max_prompt_length, max_rows=a.max_rows)
    pad, end = tokenizer.pad_token_id, common.end_token_id(tokenizer)
    if a.policy:
        policy = AutoModelForCausalLM.from_pretrained(a.policy)
    else:
        policy = AutoModelForCausalLM.from_config(common.tiny_config(tokenizer))
        policy.config.pad_token_id = pad
        common.warm_start(
            policy,
            data["chosen"],
            data["chosen_prompt_len"],
            pad,
            a.sft_steps,
            ppo.sft_batch_size,
            ppo.sft_learning_rate,
            a.seed + 10_000,
        )
        policy.save_pretrained(os.path.join(a.out, "sft"))
        tokenizer.save_pretrained(os.path.join(a.out, "sft"))

    demos = [row["chosen"] for row in ingest.load_preferences("synthetic", a.split, tokenizer, max_rows=a.max_rows)]
    config = common.sampling_config(tokenizer, ppo.max_new_tokens, ppo.temperature)
    samples, demo = [], []
    policy.eval()
    with torch.no_grad():
        for i in range(0, len(data["ids"]), 500):
            idx = range(i, min(i + 500, len(data["ids"])))
            texts = []
            for _ in range(a.samples):
                _, _, responses, _, _ = common.generate(policy, [data["ids"][j] for j in idx], pad, end, config)
                texts.append(tokenizer.batch_decode(responses, skip_special_tokens=True))
            for c, j in enumerate(idx):
                prompt, domain = data["text"][j], data["domain"][j]
                ranked = sorted(
                    (t[c] for t in texts if t[c].strip()), key=lambda r: common.synthetic_gold_reward(prompt, r, domain)
                )
                if not ranked:
                    continue
                for chosen, rejected, into in ((ranked[-1], ranked[0], samples), (demos[j], rng.choice(ranked), demo)):
                    gold = [common.synthetic_gold_reward(prompt, r, domain) for r in (chosen, rejected)]
                    if gold[0] != gold[1]:
                        chosen, rejected = (chosen, rejected) if gold[0] > gold[1] else (rejected, chosen)
                        into.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "domain": domain})
    off_policy = [
        {k: row[k] for k in ("prompt", "chosen", "rejected", "domain")}
        for row in ingest.load_preferences("synthetic-samples", a.split, tokenizer, max_rows=a.max_rows)
    ]
    outputs = [("samples", samples), ("demo", samples + demo), ("mix", samples + demo + off_policy)]
    if a.previous:
        outputs.append(("next", [json.loads(line) for line in open(a.previous)] + samples + demo))
    os.makedirs(a.out, exist_ok=True)
    for name, rows in outputs:
        with open(os.path.join(a.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{a.out}/{name}.jsonl: {len(rows)} pairs")


if __name__ == "__main__":
    main()
