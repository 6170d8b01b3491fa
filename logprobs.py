"""Token log-probabilities without the [N, T, V] logits: how `common.token_logprobs` computes them.

A first reading can skip this file. `common.token_logprobs` returns the same values and gradients as
`log_softmax(logits.float() / temperature).gather(-1, targets)`; at real vocabulary sizes (32k-152k tokens) those
logits, not the transformer, decide the memory of DPO and PPO (16 sequences of 1,024 tokens at Qwen2.5's 152k
vocabulary: 10 GB per float32 copy). So the model's output layer is replaced, for one call, by `replacing`'s
function: it takes the hidden states and computes the logits `LOGITS_CHUNK_BYTES` at a time, keeping only each
token's logit - logsumexp (`OutputLayerLogprobs`); the backward pass recomputes each chunk's logits (one matmul
more) and writes its gradient straight into the hidden states' and the weight's. Models whose logits are more
than `hidden @ W.T + b` (Gemma 2's soft-capping) keep their own logits, and `of_logits` takes the log-probs from
them a chunk of positions at a time, without a float32 copy (`SelectedLogprobs`).
"""

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

LOGITS_CHUNK_BYTES = 2**25  # float32 logits computed at once by the log-prob, entropy and KL reductions
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config fields that change logits


def output_layer(model) -> Optional[torch.nn.Linear]:
    """The model's output layer when its logits are exactly `hidden @ W.T + b` (a plain Linear, no soft-capping
    or scaling after it, as in Llama, Qwen, Mistral, GPT-2...), else None (e.g. Gemma 2 caps its logits)."""
    model = getattr(model, "module", model)  # (inside DDP)
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if type(head) is not torch.nn.Linear or any(getattr(config, f, None) for f in LOGIT_TRANSFORMS):
        return None
    return head


@contextlib.contextmanager
def replacing(head: torch.nn.Linear, targets: torch.Tensor, temperature: float, entropy: bool):
    """Within the block, `head` maps hidden states [N, T + 1, H] (the model's `logits_to_keep` positions) to the
    log-probs of `targets` [N, T] (and, with `entropy`, the entropies), stacked as [N, T, 1 or 2]."""

    def logprobs_layer(hidden):
        n, t, width = hidden.shape
        h, y = hidden[:, :-1].reshape(-1, width), targets.reshape(-1)
        out = OutputLayerLogprobs.apply(h, head.weight, head.bias, y, temperature, entropy)
        return torch.stack(out if entropy else [out], -1).view(n, t - 1, -1)

    head.forward = logprobs_layer
    try:
        yield
    finally:
        del head.forward  # (back to the class's forward)


class OutputLayerLogprobs(torch.autograd.Function):
    """log softmax((hidden @ W.T + b) / temperature) at `targets`, [M] in float32 from hidden [M, H], with the
    logits computed LOGITS_CHUNK_BYTES at a time and dropped: the forward keeps one logsumexp per row, the backward
    recomputes each chunk's logits for its gradient (onehot(target) - softmax) * grad / temperature (one matmul
    more than keeping them). With `entropy` (no gradient), also each distribution's entropy, log Z - E_p[x].
    The backward runs under the forward's autocast, so both see the same logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, entropy):
        lse = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        logps, entropies = torch.empty_like(lse), torch.empty_like(lse)
        for c in row_chunks(len(targets), weight.shape[0]):
            x = F.linear(hidden[c], weight, bias).float() / temperature
            lse[c] = x.logsumexp(-1)
            logps[c] = x.gather(-1, targets[c, None]).squeeze(-1) - lse[c]
            if entropy:
                entropies[c] = lse[c] - (x.softmax(-1) * x).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        device = hidden.device.type
        ctx.autocast = dict(device_type=device, dtype=torch.get_autocast_dtype(device))
        ctx.autocast["enabled"] = torch.is_autocast_enabled(device)
        ctx.temperature = temperature
        if not entropy:
            return logps
        ctx.mark_non_differentiable(entropies)
        return logps, entropies

    @staticmethod
    def backward(ctx, grad, *_):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_weight, need_bias = ctx.needs_input_grad[1:3]  # (not with LoRA, which freezes the output layer)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        with torch.autocast(**ctx.autocast):
            for c in row_chunks(len(targets), weight.shape[0]):
                logits = F.linear(hidden[c], weight, bias)
                g = grad[c, None] / ctx.temperature
                d = (logits.float() / ctx.temperature).sub_(lse[c, None]).exp_().mul_(-g)  # -softmax * g
                at = targets[c, None]  # + g at the target
                d = d.scatter_(-1, at, d.gather(-1, at) + g).to(logits.dtype)
                grad_hidden[c] = d @ weight
                if need_weight and d.dtype == grad_weight.dtype:
                    grad_weight.addmm_(d.T, hidden[c])  # (in place: no [V, H] temporary)
                elif need_weight:
                    grad_weight += d.T @ hidden[c]  # (bf16 autocast: the product in bf16, the sum in float32)
                if need_bias:
                    grad_bias += d.float().sum(0)
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return grad_hidden, cast(grad_weight, weight), cast(grad_bias, bias), None, None, None


def row_chunks(rows: int, vocab: int):
    """Slices of `rows` whose float32 logits fit in LOGITS_CHUNK_BYTES (at least one row each)."""
    step = max(1, LOGITS_CHUNK_BYTES // (4 * vocab))
    return [slice(i, i + step) for i in range(0, rows, step)]


def time_chunks(logits: torch.Tensor):
    """Slices of the time axis of logits [N, T, V] whose float32 copies fit in LOGITS_CHUNK_BYTES."""
    n, t, v = logits.shape
    return row_chunks(t, n * v)


class SelectedLogprobs(torch.autograd.Function):
    """log softmax(logits / temperature) at `targets`, in float32, a chunk of positions at a time. The backward
    writes each chunk's gradient, (onehot(target) - softmax) * grad / temperature, into one tensor of the logits'
    shape and dtype: no [N, T, V] float32 copy is ever held, in either pass."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        lse = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
        logps = torch.empty_like(lse)
        for t in time_chunks(logits):
            x = logits[:, t].float() / temperature
            lse[:, t] = x.logsumexp(-1)
            logps[:, t] = x.gather(-1, targets[:, t, None]).squeeze(-1) - lse[:, t]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        return logps

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for t in time_chunks(logits):
            g = grad[:, t, None] / ctx.temperature
            d = (logits[:, t].float() / ctx.temperature - lse[:, t, None]).exp_().mul_(-g)  # -softmax * g
            at = targets[:, t, None]  # + g at the target (scatter_, not scatter_add_: deterministic on GPUs too)
            out[:, t] = d.scatter_(-1, at, d.gather(-1, at) + g).to(out.dtype)
        return out, None, None


def of_logits(logits, targets, temperature: float, entropy: bool):
    """token_logprobs from a model's own logits [N, T, V]: no float32 copy of them, in either pass."""
    logps = SelectedLogprobs.apply(logits, targets, temperature)
    if not entropy:
        return logps
    entropies = []
    with torch.no_grad():
        for t in time_chunks(logits):  # H = log Z - E_p[x], chunked like the log-probs
            x = logits[:, t].float() / temperature
            entropies.append(x.logsumexp(-1) - (x.softmax(-1) * x).sum(-1))
    return logps, torch.cat(entropies, 1)
