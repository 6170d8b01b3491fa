"""A reward model's raw scores of hand-written responses, read as dro_ppo.py reads a rollout (issue 24's probe).

    python bench/rm_scores.py runs/rm/model "add: 2+3=5,4,7!,no!" "say: kemo=kemo,no!" "say: xemo=xemo,no!"

Each argument is `prompt=response,response,...` (the prompt without its newline); the higher the score, the more
the reward model prefers the response.
"""

import argparse
import os
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a dro_reward.py model folder")
    parser.add_argument("cases", nargs="+", help="prompt=response,response,...")
    a = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    for case in a.cases:
        prompt, _, responses = case.partition("=")
        responses = responses.split(",")
        seqs = [common.encode_pair(tokenizer, prompt + "\n", r, False, close=None)[0] for r in responses]
        with torch.no_grad():
            scores = common.sequence_rewards(model, seqs, tokenizer.pad_token_id).tolist()
        print(f"{prompt}: " + " / ".join(f"{r} {s:.2f}" for r, s in zip(responses, scores)))


if __name__ == "__main__":
    main()
