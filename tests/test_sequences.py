"""The shared sequence pieces of common.py, tested once, on both padding sides: completion log-probs, reward
readout, generation with the end-token cut, the k3 KL, end tokens of templates, batch order and sharding."""

import pytest
import torch
import torch.nn.functional as F
from test_compat import CHATML, situation
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import common
import dro_ppo
import ingest

LLAMA3_TEMPLATE = (  # Llama-3-Instruct's template: every turn, the assistant's too, ends with <|eot_id|>
    "{% for m in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return common.tiny_tokenizer()


@pytest.fixture(scope="module")
def seqs(tok):
    rows = ingest.load_preferences("synthetic", "validation", tok, max_rows=6)
    data = common.tokenize_preferences(rows, tok, 64, "synthetic")
    return data["chosen"][:6], data["prompt_len"][:6]


def test_pad_masks_come_from_lengths_even_when_pad_is_a_real_token():
    ids, mask = common.pad([[5, 0, 6], [7]], pad_id=0, side="right")  # the 0 inside the first row is a real token
    assert ids.tolist() == [[5, 0, 6], [7, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = common.pad([[5, 0, 6], [7]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 0, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert common.positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_completion_logprobs_by_hand_and_on_both_padding_sides(tok, seqs):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(common.tiny_config(tok)).eval()
    seqs, plens = seqs
    right, mask = common.completion_logprobs(model, seqs, plens, tok.pad_token_id, side="right")
    assert mask.sum(-1).tolist() == [len(s) - p for s, p in zip(seqs, plens)]  # response tokens + EOS
    longer = seqs + [seqs[0] * 3]  # more padding for the others
    for side in ("right", "left"):
        lp, _ = common.completion_logprobs(model, longer, plens + [3], tok.pad_token_id, side=side)
        torch.testing.assert_close(lp[:6].sum(-1), right.sum(-1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # by hand: log-softmax of the unpadded sequence at each response position
        logits = model(input_ids=torch.tensor([seqs[0]])).logits[0, :-1].log_softmax(-1)
    by_hand = sum(logits[t - 1, seqs[0][t]] for t in range(plens[0], len(seqs[0])))
    torch.testing.assert_close(right[0].sum(), by_hand, rtol=1e-5, atol=1e-5)


def test_token_logprobs_from_a_start_position_and_temperature(tok, seqs):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(common.tiny_config(tok)).eval()
    ids, mask = common.pad(seqs[0], tok.pad_token_id, side="left")
    full = common.token_logprobs(model, ids, mask, start=1, temperature=0.7)
    tail = common.token_logprobs(model, ids, mask, start=5, temperature=0.7)
    torch.testing.assert_close(tail, full[:, 4:])
    logits = model(input_ids=ids, attention_mask=mask, position_ids=common.positions(mask)).logits[:, 4:-1] / 0.7
    assert tail.shape[1] == ids.shape[1] - 5
    torch.testing.assert_close(tail, torch.gather(logits.log_softmax(-1), 2, ids[:, 5:, None]).squeeze(-1))


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_is_read_where_transformers_pooling_reads_it(tok, seqs, pad_is_eos):
    """sequence_rewards is the model's own pooling, so training, PPO and RewardBench read the same token, with
    any padding; with pad == EOS that is the token before the final EOS (the last non-pad token)."""
    torch.manual_seed(0)
    config = common.tiny_config(tok, num_labels=1)
    pad_id = tok.eos_token_id if pad_is_eos else tok.pad_token_id
    config.pad_token_id = pad_id
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    seqs, _ = seqs
    with torch.no_grad():
        alone = torch.cat([common.sequence_rewards(rm, [s], pad_id) for s in seqs])
        batched = common.sequence_rewards(rm, seqs + [seqs[0] * 3], pad_id)[:6]
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
        for s, r in zip(seqs, alone):  # by hand: the score head at the last token that is not the pad token
            hidden = rm.model(input_ids=torch.tensor([s])).last_hidden_state[0]
            read_at = max(i for i, t in enumerate(s) if t != pad_id)
            assert read_at == len(s) - (2 if pad_is_eos else 1)
            torch.testing.assert_close(rm.score(hidden[read_at]).squeeze(), r, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone[0], alone[1])


def test_cut_at_end():
    responses = torch.tensor([[5, 6, 1, 7, 8], [1, 5, 5, 5, 5], [5, 0, 6, 7, 8], [5, 6, 7, 8, 1]])
    cut, mask, ended = common.cut_at_end(responses, end_id=1, pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False, True]
    assert cut.tolist()[0] == [5, 6, 1, 0, 0] and cut.tolist()[2] == [5, 0, 6, 7, 8]  # a sampled pad token stays real


def test_cut_at_any_of_several_end_tokens():
    responses = torch.tensor([[5, 7, 1, 8], [5, 1, 7, 8], [5, 6, 6, 6]])
    cut, mask, ended = common.cut_at_end(responses, end_id=[1, 7], pad_id=0)
    assert cut.tolist() == [[5, 7, 0, 0], [5, 1, 0, 0], [5, 6, 6, 6]] and ended.tolist() == [True, True, False]


def llama3_tokenizer():
    """A Llama-3-style tokenizer built offline: byte-level BPE, BOS added by the tokenizer, EOS <|end_of_text|>, turns
    ended by <|eot_id|> in Llama-3's chat template, pad = EOS (as the scripts set it for Llama-3)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"])
    bpe.add_special_tokens(["<|eot_id|>"])
    bos = ("<|begin_of_text|>", bpe.token_to_id("<|begin_of_text|>"))
    bpe.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[bos]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos[0], eos_token="<|end_of_text|>", pad_token="<|end_of_text|>"
    )
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def scripted_llama(tok, word: int, eot: int, num_labels=None):
    """A tiny Llama whose generation_config.eos_token_id is a list, as Llama-3-Instruct's is; as a causal LM its
    logits are replaced by a script (after `word` comes `eot`, after any other token `word`): one word, then the turn
    ends, whatever the random weights."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, eot],
        pad_token_id=tok.pad_token_id,
        num_labels=num_labels or 2,
    )
    torch.manual_seed(0)
    if num_labels:
        return AutoModelForSequenceClassification.from_config(config).eval()
    model = AutoModelForCausalLM.from_config(config).eval()
    script = torch.full((len(tok),), word)
    script[word] = eot

    def replace_logits(module, args, kwargs, out):
        last = kwargs["input_ids"][:, -out.logits.shape[1] :]
        out.logits = 30.0 * F.one_hot(script[last], len(tok)).to(out.logits.dtype)
        return out

    model.register_forward_hook(replace_logits, with_kwargs=True)
    return model


def test_end_tokens_are_trls_and_the_templates():
    """EOS (or SEP), the model's generation_config.eos_token_id (an id or a list) and the template's end of turn
    where that is an added token; a tokenizer with EOS only (the embedded default) keeps its one end token."""
    byt5 = common.tiny_tokenizer()
    assert common.end_token_ids(byt5, AutoModelForCausalLM.from_config(common.tiny_config(byt5))) == [byt5.eos_token_id]
    assert common.sampling_config(byt5, 4, 1.0).eos_token_id == [byt5.eos_token_id]
    llama3 = llama3_tokenizer()
    end, eot = llama3.eos_token_id, llama3.convert_tokens_to_ids("<|eot_id|>")
    model = scripted_llama(llama3, 5, eot)
    assert model.generation_config.eos_token_id == [end, eot]
    assert common.end_token_ids(llama3, model) == common.end_token_ids(llama3) == [end, eot]  # (the template's too)
    llama3.chat_template = None  # a base model's tokenizer: the generation config still ends turns at <|eot_id|>
    assert common.end_token_ids(llama3) == [end] and common.end_token_ids(llama3, model) == [end, eot]
    base = situation("no_pad")  # EOS <|eos|>; a ChatML template ends turns with <|im_end|>, as for base Qwen2.5
    base.chat_template = CHATML
    assert common.end_token_ids(base) == [base.eos_token_id, base.convert_tokens_to_ids("<|im_end|>")]
    instruct = situation("chat_template_eos_turns")  # <|im_end|> is EOS
    assert common.end_token_ids(instruct) == [instruct.eos_token_id]


def test_rollouts_end_at_eot_id_llama3_style():
    """Llama-3: generation stops at <|eot_id|>, though EOS is <|end_of_text|>; the rollout counts as ended (no
    --missing-eos-penalty) and the reward model scores it closed with the template's turn end, as its rows; a rollout
    cut by --max-new-tokens is not ended and is scored unclosed."""
    tok = llama3_tokenizer()
    word, eot = tok.convert_tokens_to_ids("x"), tok.convert_tokens_to_ids("<|eot_id|>")
    policy, rm = scripted_llama(tok, word, eot), scripted_llama(tok, word, eot, num_labels=1)
    prompt = ingest.render([{"role": "user", "content": "hi"}], tok, add_generation_prompt=True)
    prompt_ids = [common.encode_prompt(tok, prompt, chat=True)] * 2
    end_ids = common.end_token_ids(tok, policy)
    for max_new_tokens, response, ended in ((6, [word, eot], True), (1, [word], False)):
        config = common.sampling_config(tok, max_new_tokens, 1.0, model=policy)  # sampled (the script is certain)
        _, _, responses, mask, is_ended = common.generate(policy, prompt_ids, tok.pad_token_id, end_ids, config)
        padding = [tok.pad_token_id] * (max_new_tokens - len(response))
        assert responses.tolist() == [response + padding] * 2 and mask.sum(1).tolist() == [len(response)] * 2
        assert is_ended.tolist() == [ended] * 2
        assert (dro_ppo.Args().missing_eos_penalty * (~is_ended).float()).tolist() == [0.0 if ended else 1.0] * 2
        row = common.encode_pair(tok, prompt, "x", chat=True, close=None if ended else "")[0]
        assert tok.decode(row).endswith("x<|eot_id|>" if ended else "x")
        expected = common.sequence_rewards(rm, [row] * 2, tok.pad_token_id)
        with torch.no_grad():
            for given in (is_ended.tolist(), None):  # from generate, or read from the last token
                scores = dro_ppo.rollout_scores(tok, rm, [prompt] * 2, None, [True] * 2, responses, mask, given)
                torch.testing.assert_close(scores, expected)


def test_generate_left_pads_prompts_and_cuts_responses(tok):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(common.tiny_config(tok)).eval()
    prompts = [common.encode_prompt(tok, p) for p in ("copy: ab\n", "reverse: abcdef\n")]
    config = GenerationConfig(
        max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    ids, mask, responses, response_mask, ended = common.generate(
        model, prompts, tok.pad_token_id, tok.eos_token_id, config
    )
    assert responses.shape == (2, 6) and ids.shape[1] == max(map(len, prompts)) + 6
    for i, p in enumerate(prompts):  # greedy, so each row equals its prompt generated alone
        one = common.generate(model, [p], tok.pad_token_id, tok.eos_token_id, config)[2][0]
        assert torch.equal(one, responses[i])
        assert ids[i, ids.shape[1] - 6 - len(p) : ids.shape[1] - 6].tolist() == p
    assert (mask.sum(1) == torch.tensor([len(p) for p in prompts]) + response_mask.sum(1)).all()


def test_kl_k3_never_negative_and_unbiased():
    gen = torch.Generator().manual_seed(2)
    for scale in (1e-8, 1e-4, 1e-2, 1.0, 10.0):
        logp = torch.log_softmax(torch.randn(200, 50, generator=gen) * scale, -1)[:, 0]
        ref = torch.log_softmax(torch.randn(200, 50, generator=gen) * scale, -1)[:, 0]
        kl = common.kl_k3(logp, ref)
        assert (kl >= 0).all() and torch.isfinite(kl).all(), scale
    assert (common.kl_k3(torch.zeros(5), torch.tensor([1e-9, -1e-9, 1e-7, -3e-8, 0.0])) >= 0).all()
    assert common.kl_k3(torch.tensor([-0.5]), torch.tensor([-0.5])).item() == 0.0
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])  # E_p[exp(d) - 1 - d] = KL(p || q)
    assert (p * common.kl_k3(p.log(), q.log())).sum().item() == pytest.approx(
        (p * (p / q).log()).sum().item(), rel=1e-5
    )


def test_response_is_closed_once_as_trl_closes_it(tok):
    """Plain text: prompt + response + EOS as one text (ByT5 ends every text with EOS itself: once, never twice)."""
    eos, byte = tok.eos_token_id, lambda c: tok(c, add_special_tokens=False).input_ids[0]
    ids, prompt_len = common.encode_pair(tok, "p: ", "abc")
    assert ids == [byte("p"), byte(":"), byte(" "), byte("a"), byte("b"), byte("c"), eos] and prompt_len == 3
    assert common.encode_pair(tok, "p: ", "abc</s>")[0] == ids  # already closed: not closed again
    with pytest.raises(common.DataError, match="row 7: the prompt '' tokenizes to nothing"):
        common.encode_pair(tok, "", "abc", where="x.jsonl, row 7")


def test_batch_order_and_shards():
    batches = common.batch_indices(10, 4, seed=3)
    epoch0 = [next(batches), next(batches)]
    epoch1 = next(batches)  # the 2 rows left of epoch 0 are dropped
    perm0 = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert epoch0 == [perm0[:4], perm0[4:8]]
    assert epoch1 == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()[:4]
    assert common.shard([1, 2, 3, 4, 5, 6], 1, 3) == [3, 4]
    with pytest.raises(common.DataError, match="has 3 rows, fewer than one batch of 4"):
        next(common.batch_indices(3, 4, seed=0))
