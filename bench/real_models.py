"""Real-model checks on tiny stand-ins built from configs (no downloads), measured side by side in one run.

1. Reward readout with pad == EOS (GPT-2, and Llama-style tokenizers without a pad token): a reward model trained
   by dro_reward.py is read on test_uniform three ways: as in training (`dro_reward.pair_losses`), as PPO reads a
   rollout (`dro_ppo.rollout_scores` on the response tokens cut at EOS) and as anyone loading the saved model reads
   it (the tokenizer's own padding, then the model's own pooling). Accuracy of each, and correlations.
2. A checkpoint stored in bf16 against its fp32 copy: the fraction of weight entries that 10 training steps move,
   for DPO at lr 5e-7 and the reward model at lr 1e-5 (the README's real-model learning rates).

    python bench/real_models.py                  # about 3 minutes on 2 CPU cores
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dro_ppo  # noqa: E402
import dro_reward  # noqa: E402
import ingest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def model_folder(path, arch, kind, dtype=torch.float32, pad_is_eos=True):
    """A tiny model of `arch` with the byte-level tokenizer (pad = EOS, as the scripts set for tokenizers without
    a pad token), saved in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config

    tok = common.tiny_tokenizer()
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    else:
        config = common.tiny_config(tok)
        config.pad_token_id = tok.pad_token_id
    config.num_labels = 1
    torch.manual_seed(0)
    model = (AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM).from_config(config)
    model.to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train(script, folder, out, *flags):
    cmd = [sys.executable, os.path.join(ROOT, script), "--model-name-or-path", folder, "--output-dir", out, *flags]
    subprocess.run(cmd, check=True, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return os.path.join(out, "model")


@torch.no_grad()
def readouts(path, n):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = ingest.load_preferences("synthetic", "test_uniform", tok, max_rows=n)
    data = common.tokenize_preferences(rows, tok, 64, "synthetic")
    _, train_c, train_r = dro_reward.pair_losses(model, data, range(len(data["chosen"])), tok.pad_token_id)
    ppo = []
    for key in ("chosen", "rejected"):  # each response as a rollout: the response tokens up to EOS, padded
        responses, mask = common.pad([s[p:] for s, p in zip(data[key], data["prompt_len"])], tok.pad_token_id)
        ppo.append(dro_ppo.rollout_scores(tok, model, rows["prompt"], None, rows["chat"], responses, mask))
    own = []
    for key in ("chosen", "rejected"):  # the tokenizer's own padding and the model's own pooling
        batch = tok.pad({"input_ids": data[key]}, return_tensors="pt")
        own.append(model(**batch).logits.squeeze(-1))
    accuracy = lambda c, r: 100 * ((c > r).float() + 0.5 * (c == r).float()).mean().item()
    corr = lambda a, b: torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    train_all, ppo_all, own_all = torch.cat([train_c, train_r]), torch.cat(ppo), torch.cat(own)
    return (
        accuracy(train_c, train_r),
        accuracy(*ppo),
        accuracy(*own),
        corr(train_all, ppo_all),
        corr(train_all, own_all),
        (train_all - ppo_all).abs().max().item(),
    )


def moved(before, after):
    """Fraction of the entries of the transformer's weights (embeddings and heads excluded) that changed."""
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(before, "model.safetensors")), load_file(os.path.join(after, "model.safetensors"))
    keys = [k for k in a if "layers" in k]
    changed = sum((a[k].float() != b[k].float()).sum().item() for k in keys)
    return changed / sum(a[k].numel() for k in keys)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300, help="reward-model training steps for the readout check")
    p.add_argument("--rows", type=int, default=2000, help="test_uniform rows read")
    a = p.parse_args()
    tmp = tempfile.mkdtemp()
    print(f"1. reward readout, pad == EOS, {a.steps}-step reward models, test_uniform ({a.rows} pairs)\n")
    print(
        "| model | accuracy as trained | as PPO reads it | with the tokenizer's padding + the model's pooling "
        "| corr(train, PPO) | corr(train, own) | max abs difference |\n|---|---|---|---|---|---|---|"
    )
    for arch in ("gpt2", "llama"):
        folder = model_folder(os.path.join(tmp, f"{arch}_rm"), arch, "reward")
        trained = train(
            "dro_reward.py",
            folder,
            os.path.join(tmp, f"{arch}_rm_run"),
            "--total-steps",
            str(a.steps),
            "--eval-every",
            "0",
            "--max-eval-rows",
            "64",
            "--learning-rate",
            "1e-3",
        )
        r = readouts(trained, a.rows)
        print(f"| {arch} | {r[0]:.1f} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.6f} | {r[4]:.6f} | {r[5]:.1e} |")
    print("\n2. weight entries of the transformer layers moved by 10 steps, checkpoint stored in bf16 vs float32\n")
    print(
        "| script, learning rate | stored float32 | stored bf16 (default flags: fp32 master weights) |\n|---|---|---|"
    )
    for script, kind, lr in (("dro_dpo.py", "policy", "5e-7"), ("dro_reward.py", "reward", "1e-5")):
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            folder = model_folder(os.path.join(tmp, f"{kind}_{dtype}"), "llama", kind, dtype, pad_is_eos=False)
            trained = train(
                script,
                folder,
                os.path.join(tmp, f"{kind}_{dtype}_run"),
                "--total-steps",
                "10",
                "--warmup-steps",
                "0",
                "--learning-rate",
                lr,
                "--eval-every",
                "0",
                "--max-eval-rows",
                "32",
                *(["--eval-generations", "0"] if script == "dro_dpo.py" else []),
            )
            cells.append(f"{100 * moved(folder, trained):.2f}%")
        print(f"| {script}, {lr} | {cells[0]} | {cells[1]} |")
