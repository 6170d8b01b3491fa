"""The shared sequence pieces of common.py, tested once, on both padding sides: completion log-probs, reward
readout, generation with the end-token cut, the k3 KL, end tokens of templates, batch order and sharding."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

import common
import ingest


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
