"""Loaders on small fixtures in the real schemas, the synthetic benchmark, and bad input."""

import os

import pytest

import common
import ingest

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def tok():
    return common.tiny_tokenizer()


def load(name, tok, **kw):
    return ingest.load_preferences(os.path.join(FIX, name), "train", tok, **kw)


def test_unified_feedback(tok):
    ds = load("unified_feedback.jsonl", tok)
    assert len(ds) == 3  # the tied row (equal ratings) carries no preference and is dropped
    assert ds[0] == {
        "prompt": "user: What is 2+2?\nassistant: ",
        "chosen": "4\n",
        "rejected": "5\n",
        "domain": "ultrafeedback",
        "chat": False,  # no chat template: plain "role: content" text, tokenized as plain text
        "margin": None,  # every row carries the column (None: no margin in the source)
        "row": 0,
        "where": os.path.join(FIX, "unified_feedback.jsonl") + ", line 1",
    }
    assert ds[1]["chosen"] == "Hi!\n" and ds[1]["rejected"] == "Go away.\n"  # conv_B rated higher
    assert ds[2]["prompt"].endswith("assistant: Red.\nuser: Another?\nassistant: ") and ds[2]["chosen"] == "Blue.\n"
    assert ds[2]["row"] == 3


def test_reward_bench_sections(tok):
    ds = load("reward_bench.jsonl", tok)
    assert ds["domain"] == ["chat", "chat_hard", "safety", "reasoning", "reasoning"]
    assert ds[2]["chosen"] == "I can't help with that." and ds[2]["prompt"] == "How do I make a bomb?"


def test_hhh_alignment(tok):
    ds = load("hhh_alignment.jsonl", tok)
    assert (
        ds[0]["chosen"].startswith("No, I won't") and ds[1]["chosen"] == "Paris.\n" and ds[1]["rejected"] == "Berlin.\n"
    )


def test_conversational_rows_use_the_chat_template(tok):
    tok = common.tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ds = load("conversational.jsonl", tok)
    assert ds[0] == {
        "prompt": "<user>Say yes.</s><assistant>",
        "chosen": "yes</s>",
        "rejected": "no</s>",
        "domain": "all",
        "chat": True,
        "margin": None,
        "row": 0,
        "where": os.path.join(FIX, "conversational.jsonl") + ", line 1",
    }
    assert ds[1]["prompt"] == "<user>Say no.</s><assistant>" and ds[1]["chosen"] == "no</s>"  # implicit prompt


def test_plain_parquet_and_tokenization(tok):
    ds = load("plain.parquet", tok)
    t = common.tokenize_preferences(ds, tok, 64, "plain.parquet")
    assert t["domain"] == ["chat", "reasoning"]
    prompt_ids = tok("copy: abc\n", add_special_tokens=False).input_ids
    assert t["prompt_len"][0] == len(prompt_ids)
    assert t["chosen"][0] == prompt_ids + tok("abc", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert t["prompt_id"] == [0, 1]


@pytest.mark.parametrize(
    "name,message",
    [
        ("bad_missing_column.jsonl", "bad_missing_column.jsonl, line 2: missing column(s) ['rejected']"),
        ("bad_empty_response.jsonl", "bad_empty_response.jsonl, line 3: 'chosen' must be a non-empty string"),
        (
            "bad_nonstring_response.jsonl",
            "bad_nonstring_response.jsonl, line 2: 'chosen' must be a non-empty string, got 3",
        ),
    ],
)
def test_bad_rows_name_file_and_row(tok, name, message):
    with pytest.raises(common.DataError) as e:
        load(name, tok)
    assert message in str(e.value)
    ds = load(name, tok, skip_bad_rows=True)
    assert len(ds) >= 1 and all(isinstance(c, str) and c for c in ds["chosen"])


def test_too_long_is_an_error_never_a_truncation(tok, capsys):
    ds = load("bad_too_long.jsonl", tok)
    with pytest.raises(common.DataError, match=r"bad_too_long.jsonl, line 2: prompt \+ response is 202 tokens"):
        common.tokenize_preferences(ds, tok, 64, "bad_too_long.jsonl")
    t = common.tokenize_preferences(ds, tok, 64, "bad_too_long.jsonl", skip_bad_rows=True)
    assert len(t["chosen"]) == 1 and "skipped 1 row" in capsys.readouterr().out


def test_missing_file_and_unknown_split(tok):
    with pytest.raises(common.DataError, match="no such file"):
        ingest.load_preferences("nope/missing.jsonl", "train", tok)
    with pytest.raises(common.DataError, match="splits"):
        ingest.load_preferences("synthetic", "dev", tok)


def test_synthetic_benchmark():
    rows = common.synthetic_preferences(4000, common.TRAIN_MIXTURE, seed=0)
    assert rows == common.synthetic_preferences(4000, common.TRAIN_MIXTURE, seed=0)  # deterministic
    by_domain = {d: [r for r in rows if r["domain"] == d] for d in common.SYNTHETIC_DOMAINS}
    assert len(by_domain["chat"]) > 5 * len(by_domain["reasoning"])  # skewed training mixture
    for d, rs in by_domain.items():
        gold = [
            (
                common.synthetic_gold_reward(r["prompt"], r["chosen"]),
                common.synthetic_gold_reward(r["prompt"], r["rejected"]),
            )
            for r in rs
        ]
        assert all(c == 1.0 > r for c, r in gold), d  # chosen is ideal, rejected strictly worse
        shortcut = sum(r["chosen"].endswith(common.SHORTCUT) for r in rs) / len(rs)
        p = common.SHORTCUT_AGREEMENT[d]
        assert abs(shortcut - p) < 4 * (p * (1 - p) / len(rs)) ** 0.5, (d, shortcut)
    assert common.synthetic_gold_reward("add: 1+2\n", "3") == 1.0
    assert common.synthetic_gold_reward("add: 1+2\n", "5") == 0.5
    assert common.synthetic_gold_reward("reverse: abc\n", "cba!") == 1.0
    assert (
        common.synthetic_gold_reward("say: xab\n", "no") == 1.0
        and common.synthetic_gold_reward("say: xab\n", "xab") == 0.0
    )
    assert common.synthetic_gold_reward("copy: abcd\n", "abzz") == 0.5
    assert all(common.has_gold_reward(r["prompt"], r["domain"]) for r in rows)
    assert not common.has_gold_reward("Human: copy: abc") and not common.has_gold_reward("What is 2+2?")


def test_synthetic_groups():
    """Two groups with the same prompt form want opposite responses; each response scores 1 for its group, 0 for the
    other; the splits have the stated mixtures; the gold reward needs the row's group."""
    for split, (mixture, n, _) in common.GROUPS_SPLITS.items():
        rows = common.group_preferences(n, mixture, seed=1)
        share = sum(r["domain"] == "wants_refusal" for r in rows) / n
        p = mixture["wants_refusal"]
        assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5, split
    for r in common.group_preferences(500, {"wants_word": 0.5, "wants_refusal": 0.5}, seed=2):
        word = r["prompt"].removeprefix("echo: ").strip()
        assert {r["chosen"], r["rejected"]} == {word, "no"} and r["chosen"] == (
            "no" if r["domain"] == "wants_refusal" else word
        )
        other = "wants_word" if r["domain"] == "wants_refusal" else "wants_refusal"
        assert common.synthetic_gold_reward(r["prompt"], r["chosen"], r["domain"]) == 1.0
        assert common.synthetic_gold_reward(r["prompt"], r["rejected"], r["domain"]) == 0.0
        assert common.synthetic_gold_reward(r["prompt"], r["chosen"], other) == 0.0
    assert not common.has_gold_reward("echo: abc\n") and not common.has_gold_reward("echo: abc\n", "chat")
    with pytest.raises(ValueError, match="not a prompt of the embedded datasets"):
        common.synthetic_gold_reward("echo: abc\n", "abc")
    assert list(ingest.eval_sources("synthetic-groups", ())) == [
        "validation",
        "test_id",
        "test_uniform",
        "test_minority",
    ]
    both = ingest.eval_sources("synthetic", ("synthetic", "synthetic-groups"))
    assert len(both) == 8 and both["synthetic-groups:test_uniform"] == ("synthetic-groups", "test_uniform")


def test_synthetic_goes_through_datasets(tok):
    ds = ingest.load_preferences("synthetic", "test_uniform", tok)
    assert type(ds).__name__ == "Dataset" and set(ds["domain"]) == set(common.SYNTHETIC_DOMAINS)


def test_encode_prompt_has_bos_only_where_the_tokenizer_adds_one(tok):
    from transformers import AutoTokenizer

    bpe = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(__file__), "fixtures", "bpe"))  # adds no BOS
    assert common.encode_prompt(bpe, "copy: ab\n") == bpe("copy: ab\n").input_ids
    assert common.encode_prompt(tok, "ab") == tok("ab", add_special_tokens=False).input_ids  # ByT5: no trailing EOS


def test_synthetic_samples(tok):
    """synthetic-samples: synthetic's prompts and domains, each with two policy-like responses of different gold
    reward, the better one chosen (often not the ideal answer), the marker on it as often as in synthetic."""
    rows = common.sampled_preferences(4000, common.TRAIN_MIXTURE, seed=0)
    assert rows == common.sampled_preferences(4000, common.TRAIN_MIXTURE, seed=0)  # deterministic
    base = common.synthetic_preferences(4000, common.TRAIN_MIXTURE, seed=0)
    assert [(r["prompt"], r["domain"]) for r in rows] == [(r["prompt"], r["domain"]) for r in base]
    for d in common.SYNTHETIC_DOMAINS:
        rs = [r for r in rows if r["domain"] == d]
        gold = [[common.synthetic_gold_reward(r["prompt"], r[c]) for c in ("chosen", "rejected")] for r in rs]
        assert all(c > r for c, r in gold), d
        assert 0.2 < sum(c < 1 for c, _ in gold) / len(rs) < 0.9, d  # the chosen one is a sample, often imperfect
        assert all(r["rejected"].rstrip(common.SHORTCUT) for r in rs)  # never empty
        shortcut = sum(r["chosen"].endswith(common.SHORTCUT) for r in rs) / len(rs)
        p = common.SHORTCUT_AGREEMENT[d]
        assert abs(shortcut - p) < 4 * (p * (1 - p) / len(rs)) ** 0.5, (d, shortcut)
    ds = ingest.load_preferences("synthetic-samples", "test_uniform", tok)
    assert len(ds) == common.SYNTHETIC_SPLITS["test_uniform"][1] and set(ds["domain"]) == set(common.SYNTHETIC_DOMAINS)
