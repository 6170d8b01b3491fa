"""common.token_logprobs (logprobs.py) computes logits only where they are used and log-probs as logit - logsumexp in
chunks: the same values and gradients as the direct log_softmax of every position, on every architecture of the
matrix, both padding sides, any temperature, start position and chunk size; entropy and exact KL likewise."""

import pytest
import torch
from test_compat import ARCHITECTURES
from transformers import AutoModelForCausalLM

import common
import logprobs

VOCAB = 97


def model_and_batch(arch, side, seed=0):
    torch.manual_seed(seed)
    config = ARCHITECTURES[arch](vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.attn_implementation = "eager"  # (the same kernel on every path)
    model = AutoModelForCausalLM.from_config(config).eval()
    seqs = [torch.randint(3, VOCAB, (n,)).tolist() for n in (9, 5, 12, 7)]
    ids, mask = common.pad(seqs, 0, side)
    return model, ids, mask


def direct(model, ids, mask, start, temperature):
    """The previous implementation: every position's logits, a float32 copy, a temperature copy, log_softmax."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=common.positions(mask)).logits
    logits = logits[:, start - 1 : -1].float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, ids[:, start:, None]).squeeze(-1), logits


def tolerance(logits):
    """float32 round-off of logit - logsumexp against log_softmax: a few ulps of the largest magnitude involved
    (the logits and log V), with room for the different summation order over V terms."""
    return 8 * torch.finfo(torch.float32).eps * (logits.abs().max().item() + torch.log(torch.tensor(VOCAB)).item())


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_values_and_gradients_equal_the_direct_log_softmax(arch, side, monkeypatch):
    model, ids, mask = model_and_batch(arch, side)
    weights = torch.randn(ids.shape[0], ids.shape[1] - 4)
    expected, logits = direct(model, ids, mask, 4, 0.7)
    (expected * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * ids.shape[0] * VOCAB * 3)  # 3 positions per chunk
    got = common.token_logprobs(model, ids, mask, start=4, temperature=0.7)
    (got * weights).sum().backward()
    atol = tolerance(logits)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    for name, p in model.named_parameters():
        if name in grads:  # the same backward through the same layers from inputs a few ulps apart: the error is a
            # small multiple of eps of the gradient's scale (measured: at most 0.5 eps); allow 64 eps
            bound = 64 * torch.finfo(torch.float32).eps * grads[name].abs().max().item()
            torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=bound, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_entropy_and_exact_kl_equal_the_direct_formulas(arch, monkeypatch):
    model, ids, mask = model_and_batch(arch, "left")
    reference, _, _ = model_and_batch(arch, "left", seed=1)
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * ids.shape[0] * VOCAB * 2)
    with torch.no_grad():
        _, x = direct(model, ids, mask, 3, 1.3)
        _, y = direct(reference, ids, mask, 3, 1.3)
        logps, entropy = common.token_logprobs(model, ids, mask, 3, 1.3, entropy=True)
        kl = common.token_kl(model, reference, ids, mask, 3, 1.3)
    atol = tolerance(torch.cat([x, y]))
    torch.testing.assert_close(entropy, -(x.softmax(-1) * x.log_softmax(-1)).sum(-1), rtol=0, atol=atol)
    by_hand = (x.softmax(-1) * (x.log_softmax(-1) - y.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(kl, by_hand, rtol=0, atol=2 * atol)
    assert logps.shape == kl.shape == (ids.shape[0], ids.shape[1] - 3)


def test_only_the_used_positions_reach_the_output_layer_a_chunk_at_a_time(monkeypatch):
    model, ids, mask = model_and_batch("llama", "right")
    seen, chunks = [], []
    model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    row_chunks = logprobs.row_chunks

    def record(rows, vocab):
        chunks.append([len(range(rows)[c]) for c in row_chunks(rows, vocab)])
        return row_chunks(rows, vocab)

    monkeypatch.setattr(logprobs, "row_chunks", record)
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 5)  # 5 positions' float32 logits at a time
    common.token_logprobs(model, ids, mask, start=8).sum().backward()
    assert seen == [ids.shape[1] - 7]  # positions 7 .. T - 1 reach the output layer, not T
    assert chunks == [[5, 5, 5, 1]] * 2  # 4 rows x 4 predicting positions (the last one predicts nothing), both passes


def test_no_tensor_of_the_logits_size_is_kept_for_the_backward():
    """What the forward pass saves for the backward pass, at a vocabulary much larger than the hidden size: the
    transformer's activations and one chunk's inputs, never [N, T, V] logits (nor a chunk of them)."""
    vocab = 4096
    torch.manual_seed(0)
    config = ARCHITECTURES["llama"](vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    ids, mask = common.pad([torch.randint(3, vocab, (n,)).tolist() for n in (40, 33, 25, 40)], 0)
    logits_bytes = 4 * ids.shape[0] * (ids.shape[1] - 1) * vocab
    saved, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:  # (the output layer's [V, H] weight is saved, of course)
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = common.token_logprobs(model, ids, mask)
    assert max(saved.values()) < logits_bytes / 16
    logps.sum().backward()  # (and the backward pass recomputes what it needs)
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_models_whose_logits_are_more_than_the_output_layer_keep_them(arch):
    model, _, _ = model_and_batch(arch, "right")
    assert (logprobs.output_layer(model) is None) == (arch == "gemma2")  # Gemma 2 soft-caps its logits


def test_the_backward_keeps_no_float32_copy_of_the_logits():
    """What the graph saves for the backward pass: the logits themselves (no copy), the targets and one float32
    logsumexp per position; the previous path also saved a float32 log_softmax of every position."""
    logits = torch.randn(4, 50, VOCAB, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (4, 50))
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = logprobs.SelectedLogprobs.apply(logits, targets, 0.7)
    extra = sum(n for ptr, n in dict(saved).items() if ptr != logits.untyped_storage().data_ptr())
    assert extra <= targets.numel() * (8 + 4)  # the targets (int64) and the logsumexp (float32)
    weights = torch.randn_like(logps)
    (logps * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    ((logits.float() / 0.7).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1) * weights).sum().backward()
    assert grad.dtype == torch.bfloat16  # rounded once, from the same float32 value the direct path rounds
    torch.testing.assert_close(grad, logits.grad, rtol=0, atol=2**-7 * logits.grad.abs().max().item())


def test_bf16_autocast_gives_the_direct_paths_values_and_gradients():
    """Under --bf16's autocast the output layer runs in bf16 in both passes, as the model's own layer does."""
    model, ids, mask = model_and_batch("llama", "right")
    weights = torch.randn(ids.shape[0], ids.shape[1] - 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, logits = direct(model, ids, mask, 2, 0.9)
        (expected * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = common.token_logprobs(model, ids, mask, start=2, temperature=0.9)
        (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance(logits))  # the same bf16 logits
    for name, p in model.named_parameters():  # bf16 matmuls whose float32 inputs were a few ulps apart
        torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=2**-6 * grads[name].abs().max().item(), msg=name)
