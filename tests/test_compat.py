"""The models and tokenizers users bring: architectures built from configs x tokenizer situations, with the small BPE
tokenizer of tests/fixtures/bpe (tests/make_bpe_tokenizer.py), saved to folders and loaded the way the scripts load
--model-name-or-path. For every cell: the reward read in training, in PPO and through transformers' own pooling
agree; log-probs and rewards do not change with padding on either side; a training step is finite; the saved model
and tokenizer reload with the Auto classes and score / generate the same. A few cells run the scripts end to end."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

import common
import dro_dpo
import dro_ppo
import dro_reward
import ingest
import lifecycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE = os.path.join(ROOT, "tests", "fixtures", "bpe")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def situation(name):
    """The BPE tokenizer configured as one of the situations users' tokenizers come in."""
    tok = AutoTokenizer.from_pretrained(BPE)
    if name == "pad_is_eos":
        tok.pad_token = tok.eos_token
    elif name == "left_padding":
        tok.pad_token, tok.padding_side = "<|pad|>", "left"
    elif name == "chat_template_eos_turns":  # ChatML: the EOS token ends every turn
        tok.pad_token, tok.eos_token, tok.chat_template = "<|pad|>", "<|im_end|>", CHATML
    elif name == "bos_added":  # the tokenizer itself adds BOS, Llama-style
        tok.pad_token = "<|pad|>"
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", tok.bos_token_id)]
        )
    elif name == "bos_is_pad":  # GPT-2: one token is BOS, EOS and pad
        tok.bos_token = tok.pad_token = tok.eos_token
    else:
        assert name == "no_pad"  # the scripts set pad = EOS
    return tok


SITUATIONS = ["no_pad", "pad_is_eos", "left_padding", "chat_template_eos_turns", "bos_added", "bos_is_pad"]
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ARCHITECTURES = {
    "gpt2": lambda **ids: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **ids),
    "llama": lambda **ids: transformers.LlamaConfig(**SMALL, **ids),
    "qwen2": lambda **ids: transformers.Qwen2Config(**SMALL, **ids),
    "qwen3": lambda **ids: transformers.Qwen3Config(**SMALL, head_dim=16, **ids),
    "mistral": lambda **ids: transformers.MistralConfig(**SMALL, **ids),
    "gemma2": lambda **ids: transformers.Gemma2Config(**SMALL, head_dim=16, **ids),
    "phi3": lambda **ids: transformers.Phi3Config(**{**SMALL, "num_key_value_heads": 2}, **ids),
    "gpt_neox": lambda **ids: transformers.GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        **ids,
    ),
}


def user_args(folder):
    return SimpleNamespace(
        model_name_or_path=str(folder),
        tokenizer_name_or_path=None,
        trust_remote_code=False,
        attn_implementation=None,
        bf16=False,
    )


def model_folder(tmp_path, arch, name, auto):
    """A tiny model of `arch` and a tokenizer in situation `name`, saved to a folder, then loaded as the scripts do."""
    folder = tmp_path / f"{arch}-{name}-{auto.__name__}"
    situation(name).save_pretrained(folder)
    ARCHITECTURES[arch]().save_pretrained(folder)  # AutoTokenizer picks a tokenizer class by the model type
    tok = lifecycle.load_tokenizer(user_args(folder))  # as the scripts load it
    config = ARCHITECTURES[arch](
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    config.num_labels = 1
    torch.manual_seed(0)
    auto.from_config(config).save_pretrained(folder)
    model = lifecycle.load_model(auto, str(folder), user_args(folder), tok).eval()
    model.config.pad_token_id = tok.pad_token_id
    return folder, tok, model


def grown_unified_feedback(path, n):
    """The Unified-Feedback fixture's first two rows repeated to n rows, each prompt made unique."""
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "tests", "fixtures", "unified_feedback.jsonl"))][:2]
    with open(path, "w") as f:
        for i in range(n):
            row = json.loads(json.dumps(rows[i % 2]))
            row["conv_A"][0]["content"] = row["conv_B"][0]["content"] = f"{row['conv_A'][0]['content']} ({i})"
            f.write(json.dumps(row) + "\n")


def pairs(tok, name):
    """Tokenized preference rows: conversational (rendered with the chat template) for the chat situation."""
    if name == "chat_template_eos_turns":
        rows = ingest.load_preferences(os.path.join(ROOT, "tests", "fixtures", "conversational.jsonl"), "train", tok)
    else:
        rows = ingest.load_preferences("synthetic", "validation", tok, max_rows=4)
    return rows, common.tokenize_preferences(rows, tok, 128, "rows")


@pytest.mark.parametrize("name", SITUATIONS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_reward_models(tmp_path, arch, name):
    folder, tok, model = model_folder(tmp_path, arch, name, AutoModelForSequenceClassification)
    rows, data = pairs(tok, name)
    seqs, plens = data["chosen"] + data["rejected"], data["prompt_len"] * 2
    end = common.end_token_id(tok)
    if name == "chat_template_eos_turns":  # the template's text: the turn ends "<|im_end|>\n", as TRL keeps it
        assert all(
            tok.decode(s).endswith("<|im_end|>\n") and s.count(end) == tok.decode(s).count("<|im_end|>") for s in seqs
        )
    else:  # plain text + EOS, once
        assert all(s[-1] == end and s[-2] != end for s in seqs)
    with torch.no_grad():
        train = common.sequence_rewards(model, seqs, tok.pad_token_id)
        alone = torch.cat([common.sequence_rewards(model, [s], tok.pad_token_id) for s in seqs])
        rollouts = [s[p:][: s[p:].index(end) + 1] for s, p in zip(seqs, plens)]  # generation stops at the end token
        responses, mask = common.pad(rollouts, tok.pad_token_id)
        ppo = dro_ppo.rollout_scores(
            tok, model, list(rows["prompt"]) * 2, None, list(rows["chat"]) * 2, responses, mask
        )
        own = model(**tok.pad({"input_ids": seqs}, padding_side="right", return_tensors="pt")).logits.squeeze(-1)
        torch.testing.assert_close(train, alone, rtol=1e-4, atol=1e-5)  # padding changes nothing
        torch.testing.assert_close(ppo, train, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(own, train, rtol=1e-4, atol=1e-5)
        assert len(set(train.tolist())) > 1
    losses, _, _ = dro_reward.pair_losses(model, data, range(len(data["chosen"])), tok.pad_token_id)
    losses.mean().backward()
    assert torch.isfinite(losses).all() and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    again = AutoModelForSequenceClassification.from_pretrained(folder)
    model.save_pretrained(folder)
    again = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            common.sequence_rewards(
                again, seqs, AutoTokenizer.from_pretrained(folder).pad_token_id or tok.pad_token_id
            ),
            train,
        )


@pytest.mark.parametrize("name", SITUATIONS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_policies(tmp_path, arch, name):
    folder, tok, model = model_folder(tmp_path, arch, name, AutoModelForCausalLM)
    rows, data = pairs(tok, name)
    seqs, plens = data["chosen"], data["prompt_len"]
    longer = seqs + [seqs[0] * 2]
    with torch.no_grad():
        right, mask = common.completion_logprobs(model, seqs, plens, tok.pad_token_id, side="right")
        for side in ("right", "left"):
            logps, _ = common.completion_logprobs(model, longer, plens + [1], tok.pad_token_id, side=side)
            torch.testing.assert_close(logps[: len(seqs)].sum(-1), right.sum(-1), rtol=1e-4, atol=1e-4)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    losses, chosen, rejected = dro_dpo.pair_losses(
        model, reference, data, range(len(data["chosen"])), tok.pad_token_id, 0.1
    )
    losses.mean().backward()
    assert torch.isfinite(losses).all() and torch.allclose(chosen, torch.zeros_like(chosen), atol=1e-5)  # policy == ref
    # generation: prompts encoded as in training, greedy, the same after save and reload
    prompt_ids = [common.encode_prompt(tok, p) for p in rows["prompt"][:3]]
    config = GenerationConfig(
        max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=common.end_token_id(tok)
    )
    out = common.generate(model, prompt_ids, tok.pad_token_id, common.end_token_id(tok), config)
    model.save_pretrained(folder)
    again = common.generate(
        AutoModelForCausalLM.from_pretrained(folder).eval(),
        prompt_ids,
        tok.pad_token_id,
        common.end_token_id(tok),
        config,
    )
    assert torch.equal(out[2], again[2]) and torch.equal(out[3], again[3])
    for p, r in zip(prompt_ids, out[2]):  # each row as if generated alone: left padding hides nothing
        alone = common.generate(model, [p], tok.pad_token_id, common.end_token_id(tok), config)[2][0]
        assert torch.equal(alone, r)


def test_encoder_reward_models(tmp_path):
    """BERT-style reward models (no EOS): sequences are CLS prompt response SEP as the tokenizer itself adds them;
    the model pools CLS."""
    tok = AutoTokenizer.from_pretrained(BPE)
    tok.cls_token, tok.sep_token, tok.pad_token = "<|bos|>", "<|eos|>", "<|pad|>"
    tok.bos_token = tok.eos_token = None
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A <|eos|>",
        pair="<|bos|> $A <|eos|> $B <|eos|>",
        special_tokens=[("<|bos|>", tok.cls_token_id), ("<|eos|>", tok.sep_token_id)],
    )
    config = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    folder = tmp_path / "bert"
    tok.save_pretrained(folder)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tok = lifecycle.load_tokenizer(user_args(folder))
    model = lifecycle.load_model(AutoModelForSequenceClassification, str(folder), user_args(folder), tok).eval()
    _, data = pairs(tok, "bert")
    assert data["chosen"][0][0] == tok.cls_token_id and data["chosen"][0][-1] == tok.sep_token_id
    with torch.no_grad():
        scores = common.sequence_rewards(model, data["chosen"], tok.pad_token_id)
        alone = torch.cat([common.sequence_rewards(model, [s], tok.pad_token_id) for s in data["chosen"]])
    torch.testing.assert_close(scores, alone, rtol=1e-4, atol=1e-5)


def conversational_rows(path, n=24):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"copy: {w}"}],
            "chosen": [{"role": "assistant", "content": w}],
            "rejected": [{"role": "assistant", "content": w[::-1] + "x"}],
        }
        for w in ("abc", "hello", "xyz", "dog") * (n // 4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("arch,name", [("gpt2", "bos_is_pad"), ("qwen2", "chat_template_eos_turns")])
def test_scripts_run_end_to_end(tmp_path, arch, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = conversational_rows(tmp_path / "conv.jsonl")
    for script, auto, flags in [
        (
            "dro_reward.py",
            AutoModelForSequenceClassification,
            ["--dataset", data, "--eval-datasets", data, "--max-length", "128"],
        ),
        ("dro_dpo.py", AutoModelForCausalLM, ["--dataset", data, "--eval-datasets", data, "--max-length", "128"]),
        ("dro_ppo.py", AutoModelForCausalLM, ["--max-eval-rows", "8"]),  # synthetic prompts: the gold reward
    ]:
        folder, _, _ = model_folder(tmp_path, arch, name, auto)
        out = tmp_path / f"{script}-run"
        cmd = [
            sys.executable,
            os.path.join(ROOT, script),
            "--model-name-or-path",
            str(folder),
            "--output-dir",
            str(out),
            "--total-steps",
            "2",
            "--batch-size",
            "8",
            *flags,
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, (script, proc.stderr[-3000:])
        assert auto.from_pretrained(out / "model") is not None and AutoTokenizer.from_pretrained(out / "model")
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert rows and all(v == v for r in rows for v in r.values() if isinstance(v, float))  # no NaN


def test_a_tokenizer_that_is_not_the_models_own_is_a_clear_error(tmp_path):
    """A Qwen2 config saved beside a byte tokenizer: transformers builds a Qwen2 tokenizer from files that are not
    there, which encodes text to nothing. Before: training on empty sequences and a 50% table. Now: an error naming
    the row."""
    folder = tmp_path / "mismatch"
    common.tiny_tokenizer().save_pretrained(folder)
    ARCHITECTURES["qwen2"](vocab_size=384).save_pretrained(folder)
    tok = lifecycle.load_tokenizer(user_args(folder))
    with pytest.raises(common.DataError, match=r"synthetic validation, row 0: the prompt .* tokenizes to nothing"):
        pairs(tok, "no_pad")


def test_the_readmes_paper_scale_commands_run_as_written(tmp_path):
    """The README's real-data recipes, run as written with tiny stand-ins: a Qwen2 built from a config for
    Qwen/Qwen2.5-0.5B-Instruct, fixtures in the real schemas (Unified-Feedback grown to 600 rows) for the hub
    datasets, 2 processes for 8, and one step (budget flags appended, which tyro lets override); --bf16 runs on
    the CPU."""
    import re

    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme[readme.index("# the paper's setting") :]
    block = block[: block.index("```")]
    commands = [c for c in re.sub(r"\\\n\s*", "", block).splitlines() if c and not c.startswith("#")]
    assert len(commands) == 3
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    grown_unified_feedback(tmp_path / "uf.jsonl", 600)
    policy, _, _ = model_folder(tmp_path, "qwen2", "chat_template_eos_turns", AutoModelForCausalLM)
    reward, _, _ = model_folder(tmp_path, "qwen2", "chat_template_eos_turns", AutoModelForSequenceClassification)
    names = {
        "llm-blender/Unified-Feedback": str(tmp_path / "uf.jsonl"),
        "allenai/reward-bench": os.path.join(fixtures, "reward_bench.jsonl"),
        "HuggingFaceH4/hhh_alignment": os.path.join(fixtures, "hhh_alignment.jsonl"),
        "runs/<reward run>/model": str(tmp_path / "rm" / "model"),
        "torchrun --nproc_per_node 8": f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2",
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i, command in enumerate(commands):
        for hub, local in names.items():
            command = command.replace(hub, local)
        folder = str(reward if "dro_reward.py" in command else policy)
        command = command.replace("Qwen/Qwen2.5-0.5B-Instruct", folder).replace("python dro_", f"{sys.executable} dro_")
        out = tmp_path / ("rm" if i == 0 else f"run{i}")
        budget = ["--total-steps", "1"] + ([] if "dro_reward.py" in command else ["--max-new-tokens", "4"])
        cmd = command.split() + ["--output-dir", str(out), *budget]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        assert os.path.exists(out / "model" / "config.json")
