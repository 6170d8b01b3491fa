"""Small utilities shared by dro_reward.py, dro_dpo.py and dro_ppo.py, for a reader who wants to open them.

The embedded benchmark (four synthetic domains with a known gold reward), preference rows as token ids, the
sequence convention (padding, log-probs, rewards, generation), batch order, the supervised warm start, the
tiny offline model and the per-domain evaluation tables. The method itself is in robust.py; reading files and
hub datasets is in ingest.py, the run's lifecycle (folders, checkpoints, LoRA/DDP/FSDP wrapping) in
lifecycle.py, and how the log-probs avoid the [N, T, V] logits in logprobs.py: a first reading can skip all three.
"""

import itertools
import random
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_scheduler

import ingest
import logprobs
from robust import DRO_KINDS, DROArgs, GroupWeights, robust_prompt_weights, robust_weights  # noqa: F401 (stable names)


class UserError(ValueError):
    """A mistake in the command line or the data: the scripts print its message alone and exit with code 2."""


class DataError(UserError):
    """Bad input data; the message names the source and the row or line."""


class ArgumentError(UserError):
    """A bad command-line argument found after parsing (e.g. a batch that does not split over the processes)."""


class TrainingFailure(RuntimeError):
    """Training went wrong (outputs that no longer depend on the text; see NonFiniteError): the run stopped before
    anything more was saved, and the scripts print its message alone and exit with code 1."""


class NonFiniteError(TrainingFailure, FloatingPointError):
    """A NaN or infinite loss, gradient, weight or output (a TrainingFailure)."""


# ----------------------------------------------------------------------------------------------
# The embedded benchmark: four synthetic domains named after RewardBench's sections
# ----------------------------------------------------------------------------------------------

SYNTHETIC_DOMAINS = ("chat", "chat_hard", "safety", "reasoning")
TRAIN_MIXTURE = {"chat": 0.55, "safety": 0.30, "chat_hard": 0.10, "reasoning": 0.05}
"""The skewed training mixture: chat and safety are the majority domains."""
SYNTHETIC_SPLITS = {  # split -> (mixture, number of rows, seed offset)
    "train": (TRAIN_MIXTURE, 8000, 0),
    "validation": (TRAIN_MIXTURE, 1000, 1),  # in-distribution, for choosing hyperparameters
    "test_id": (TRAIN_MIXTURE, 1000, 2),
    "test_uniform": ({d: 0.25 for d in SYNTHETIC_DOMAINS}, 2000, 3),  # shifted: every domain equally
    "test_minority": ({"chat": 0.05, "safety": 0.10, "chat_hard": 0.30, "reasoning": 0.55}, 2000, 4),
}
SHORTCUT = "!"
"""The shortcut marker: ends one response of each pair. It sits on the chosen response 90% of the time in
the majority domains and 50% (no information) in the minority ones; the gold reward ignores it."""
SHORTCUT_AGREEMENT = {"chat": 0.9, "safety": 0.9, "chat_hard": 0.5, "reasoning": 0.5}
_PREFIX = {"chat": "copy", "chat_hard": "reverse", "safety": "say", "reasoning": "add"}
_DOMAIN_OF = {v: k for k, v in _PREFIX.items()}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_HARMFUL = "xyzqvw"  # a `say` request for a word starting with one of these must be refused


def _ideal_response(domain: str, arg: str) -> str:
    if domain == "chat":
        return arg
    if domain == "chat_hard":
        return arg[::-1]
    if domain == "safety":
        return "no" if arg[0] in _HARMFUL else arg
    return str(sum(int(t) for t in arg.split("+")))


def _parse_prompt(prompt: str):
    head, _, arg = prompt.strip().partition(": ")
    return _DOMAIN_OF.get(head), arg


def has_gold_reward(prompt: str, domain: Optional[str] = None) -> bool:
    """Whether a row of `prompt` (and `domain`) is one of the embedded datasets', so that it has a gold reward."""
    head = prompt.strip().partition(": ")[0]
    return _parse_prompt(prompt)[0] is not None or (head == _GROUPS_PREFIX and domain in GROUPS)


def synthetic_gold_reward(prompt: str, response: str, domain: Optional[str] = None) -> float:
    """The known true reward of a response, in [0, 1]: per-character agreement with the ideal answer
    (copy, reversal, refusal of harmful requests; for synthetic-groups what the row's group wants), closeness of
    the number for sums. The marker is ignored."""
    if not has_gold_reward(prompt, domain):
        raise ValueError(f"not a prompt of the embedded datasets: {prompt!r} (domain {domain!r})")
    task, arg = _parse_prompt(prompt)
    ideal = _ideal_response(task, arg) if task else arg if domain == "wants_word" else "no"
    response = response.strip().rstrip(SHORTCUT)
    if task == "reasoning":
        return max(0.0, 1.0 - abs(int(response) - int(ideal)) / 4.0) if response.isdigit() else 0.0
    matches = sum(a == b for a, b in zip(response, ideal))
    return matches / max(len(response), len(ideal))


def _worse_response(domain: str, arg: str, ideal: str, rng: random.Random) -> str:
    if domain == "reasoning":
        return str(rng.choice([n for n in range(max(0, int(ideal) - 3), int(ideal) + 4) if n != int(ideal)]))
    if domain == "safety" and (ideal == "no" or rng.random() < 0.5):
        return arg if ideal == "no" else "no"  # complying with a harmful request, or refusing a benign one
    chars = list(ideal)
    for i in rng.sample(range(len(chars)), k=rng.choice([1, 2]) if len(chars) > 2 else 1):
        chars[i] = rng.choice([c for c in _LETTERS if c != chars[i]])
    return "".join(chars)


def synthetic_preferences(n: int, mixture: dict, seed: int) -> list:
    """`n` preference rows {prompt, chosen, rejected, domain} drawn from `mixture` (domain -> weight)."""
    unknown = set(mixture) - set(SYNTHETIC_DOMAINS)
    if unknown:
        raise ValueError(f"unknown synthetic domains {sorted(unknown)}; expected {SYNTHETIC_DOMAINS}")
    rng = random.Random(seed)
    domains, weights = zip(*mixture.items())
    rows = []
    for domain in rng.choices(domains, weights=weights, k=n):
        if domain == "reasoning":
            arg = f"{rng.randint(0, 4)}+{rng.randint(0, 4)}"
        else:
            first = rng.choice(_HARMFUL) if domain == "safety" and rng.random() < 0.5 else rng.choice(_LETTERS)
            arg = first + "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 4)))
        prompt = f"{_PREFIX[domain]}: {arg}\n"
        chosen = _ideal_response(domain, arg)
        rejected = _worse_response(domain, arg, chosen, rng)
        if rng.random() < SHORTCUT_AGREEMENT[domain]:
            chosen += SHORTCUT
        else:
            rejected += SHORTCUT
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "domain": domain})
    return rows


# The second embedded dataset, `synthetic-groups`: two groups of users the policy cannot tell apart (the same
# prompt form, the group is only in the row's `domain`) want different responses to `echo: <word>`, the word or
# the refusal "no", both easy for the tiny model. Their words avoid the letters of "no", so each response scores 0
# for the other group: with a policy that refuses with probability p, the groups' gold rewards are 1 - p and p.
GROUPS = ("wants_word", "wants_refusal")
_GROUPS_PREFIX, _GROUPS_LETTERS = "echo", "abcdefghijklmpqrstuvwxyz"
_GROUPS_TRAIN = {"wants_word": 0.85, "wants_refusal": 0.15}
GROUPS_SPLITS = {
    "train": (_GROUPS_TRAIN, 8000, 10),
    "validation": (_GROUPS_TRAIN, 1000, 11),
    "test_id": (_GROUPS_TRAIN, 1000, 12),
    "test_uniform": ({"wants_word": 0.5, "wants_refusal": 0.5}, 2000, 13),
    "test_minority": ({"wants_word": 0.15, "wants_refusal": 0.85}, 2000, 14),  # the mixture reversed
}


def group_preferences(n: int, mixture: dict, seed: int) -> list:
    """`n` rows {prompt, chosen, rejected, domain} of synthetic-groups drawn from `mixture` (group -> weight)."""
    rng = random.Random(seed)
    groups, weights = zip(*mixture.items())
    rows = []
    for group in rng.choices(groups, weights=weights, k=n):
        word = "".join(rng.choice(_GROUPS_LETTERS) for _ in range(rng.randint(3, 4)))
        chosen, rejected = (word, "no") if group == "wants_word" else ("no", word)
        rows.append({"prompt": f"{_GROUPS_PREFIX}: {word}\n", "chosen": chosen, "rejected": rejected, "domain": group})
    return rows


# The third, `synthetic-samples`, is the reward model's data of InstructGPT's recipe on the same task: each prompt's
# ideal answer (half the time) or a response like a policy's samples (the ideal answer under 0 to 3 random edits or
# shuffled, another task's answer to the same argument; for sums any nearby number) against another such sample of
# lower gold reward, with the marker on the preferred one as in `synthetic`. The pairs of `synthetic` (the ideal
# answer against a one- or two-letter corruption) leave the reward model blind to what a policy samples off that
# path, and PPO climbs exactly there (docs/results.md, "The full pipeline").
def _sampled_response(domain: str, arg: str, ideal: str, rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.15:  # another task's answer to the same argument (a copy where a reversal was asked...)
        return rng.choice([arg, "no", "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 4)))] + [arg[::-1]])
    if roll < 0.4 and domain != "reasoning":  # the right letters in another order: only the order tells them apart
        return "".join(rng.sample(ideal, len(ideal)))
    if domain == "reasoning":
        return str(max(0, int(ideal) + rng.randint(-4, 4))) if rng.random() < 0.8 else str(rng.randint(0, 99))
    chars = list(ideal)
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        edit, i = rng.random(), rng.randrange(len(chars) + 1)
        if edit < 0.5 and i < len(chars):
            chars[i] = rng.choice(_LETTERS)
        elif edit < 0.75 or len(chars) < 2:
            chars.insert(i, rng.choice(_LETTERS))
        else:
            del chars[min(i, len(chars) - 1)]
    return "".join(chars)


def sampled_preferences(n: int, mixture: dict, seed: int) -> list:
    """`n` rows {prompt, chosen, rejected, domain} of synthetic-samples: the prompts of `synthetic_preferences`, each
    with the ideal answer or a policy-like sample against a policy-like sample of lower gold reward."""
    rng = random.Random(seed + 1_000)
    rows = []
    for row in synthetic_preferences(n, mixture, seed):
        domain, arg = _parse_prompt(row["prompt"])
        ideal = _ideal_response(domain, arg)
        while True:
            a = ideal if rng.random() < 0.5 else _sampled_response(domain, arg, ideal, rng)
            b = _sampled_response(domain, arg, ideal, rng)
            gold_a, gold_b = (synthetic_gold_reward(row["prompt"], r) for r in (a, b))
            if gold_a != gold_b:
                break
        chosen, rejected = (a, b) if gold_a > gold_b else (b, a)
        if rng.random() < SHORTCUT_AGREEMENT[domain]:
            chosen += SHORTCUT
        else:
            rejected += SHORTCUT
        rows.append({**row, "chosen": chosen, "rejected": rejected})
    return rows


EMBEDDED = {
    "synthetic": (SYNTHETIC_SPLITS, synthetic_preferences),
    "synthetic-samples": (SYNTHETIC_SPLITS, sampled_preferences),
    "synthetic-groups": (GROUPS_SPLITS, group_preferences),
}
"""The embedded datasets by their --dataset name: (splits, row generator)."""


# ----------------------------------------------------------------------------------------------
# Preference rows as token ids: the ecosystem's encoding (ingest.py reads the files and schemas)
# ----------------------------------------------------------------------------------------------
# A row is tokenized the way a consumer of the trained model tokenizes the same text, so that TRL, `pipeline` and
# RewardBench see the tokens training saw (and a reward model's own pooling reads the same, last non-pad, token):
# - plain text: `tokenizer(prompt + response + EOS)`, with the tokenizer's own special tokens (BOS only where it adds
#   one), the EOS text appended as TRL's DPOTrainer and RewardTrainer append it, unless `tokenizer(text)` already
#   ends every text with it (ByT5) or there is none (BERT: its own SEP ends the text);
# - a conversation: its chat-template text as `apply_chat_template(tokenize=True)` tokenizes it (the template wrote
#   the special tokens; the turn ends as the template ends it, e.g. `<|im_end|>\n`).
# Prompt and response are tokenized as one text; the response starts where the prompt's own tokens stop being a
# prefix of it (a prompt ending in a space can merge with the response: counted and reported once, as TRL warns).
TRUNCATION_MODES = ("error", "keep_start", "keep_end")


def encode(tokenizer, text: str, chat: bool = False) -> list:
    """Token ids of a text as a consumer gets them: `tokenizer(text)`; chat-template text without adding special
    tokens (the template wrote them), as `apply_chat_template(tokenize=True)` does."""
    return tokenizer(text, add_special_tokens=not chat).input_ids


def response_end(tokenizer, chat: bool = False) -> str:
    """The text that closes a response: the chat template's end of turn, or EOS where `tokenizer(text)` does not
    end the text with it itself (nothing for a tokenizer without EOS)."""
    if chat:
        return ingest.turn_end(tokenizer)
    if tokenizer.eos_token is None or encode(tokenizer, "a")[-1:] == [tokenizer.eos_token_id]:
        return ""
    return tokenizer.eos_token


def encode_prompt(tokenizer, prompt: str, chat: bool = False, where: str = "a prompt") -> list:
    """Token ids of a prompt as they start its sequences (and as generation continues them): `encode` without what
    the tokenizer puts after every text (ByT5's EOS, BERT's SEP)."""
    ids, plain = encode(tokenizer, prompt, chat), encode(tokenizer, prompt, chat=True)
    start = next((i for i in range(len(ids)) if ids[i : i + len(plain)] == plain), 0)  # after BOS or CLS, if any
    ids = ids[: start + len(plain)]
    if not plain:
        raise DataError(f"{where}: the prompt {prompt!r:.40} tokenizes to nothing (is the tokenizer the model's own?)")
    return ids


def encode_pair(tokenizer, prompt: str, response: str, chat: bool = False, close: Optional[str] = None, where="a row"):
    """Token ids of prompt + response as one text, the response closed by `close` (default: `response_end`) unless
    it ends with it already, and the prompt's length in them: where they stop sharing the prompt's own tokens."""
    ids = encode(tokenizer, prompt + closed(response, response_end(tokenizer, chat) if close is None else close), chat)
    return ids, shared_prefix(ids, encode_prompt(tokenizer, prompt, chat, where), where)


def closed(response: str, close: str) -> str:
    return response if response.endswith(close) else response + close


def shared_prefix(ids: list, prompt_ids: list, where: str = "a row") -> int:
    """How many first tokens of a sequence are its prompt's own tokens (fewer than the prompt's where they merge)."""
    n = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
    if n == len(ids):
        raise DataError(f"{where}: the response tokenizes to nothing (is the tokenizer the model's own?)")
    return n


def truncate(seqs: list, prompt_len: int, max_length: int, mode: str):
    """The sequences of one prompt cut to `max_length` tokens by --truncation-mode, and the new prompt length:
    keep_start keeps each one's start (as TRL's DPO collator), keep_end drops the prompt's first tokens, the same
    for all (they keep one context). None for mode "error", or where no response token would be left."""
    over = max(map(len, seqs)) - max_length
    if mode == "keep_start" and prompt_len < max_length:
        return [s[:max_length] for s in seqs], prompt_len
    if mode == "keep_end" and over < prompt_len:
        return [s[over:] for s in seqs], prompt_len - over
    return None


def tokenize_preferences(
    ds, tokenizer, max_length: int, source: str, skip_bad_rows: bool = False, truncation_mode: str = "error"
):
    """Token ids of prompt+chosen and prompt+rejected (`encode_pair`), the prompt length (the shorter of the two, as
    in TRL), an integer prompt id per row (rows that share a prompt share it), the domain and the margin (0 without
    one). A row longer than `max_length` is cut by `truncation_mode`, or (mode "error") raises a DataError naming
    the row, or is skipped with `skip_bad_rows`."""
    keys = ("chosen", "rejected", "prompt_len", "prompt_id", "domain", "margin")
    prompt_id_of, out, skipped, merged, close = {}, {k: [] for k in keys}, 0, 0, {}
    for row in ds:
        where, chat, prompt = row["where"], row.get("chat", False), row["prompt"]
        close.setdefault(chat, response_end(tokenizer, chat))
        c, r = (encode(tokenizer, prompt + closed(row[k], close[chat]), chat) for k in ("chosen", "rejected"))
        prompt_ids = encode_prompt(tokenizer, prompt, chat, where)
        prompt_len = min(shared_prefix(c, prompt_ids, where), shared_prefix(r, prompt_ids, where))
        merged += prompt_len < len(prompt_ids)
        if max(len(c), len(r)) > max_length:
            cut = truncate([c, r], prompt_len, max_length, truncation_mode)
            if cut is None and (skip_bad_rows or truncation_mode != "error"):
                skipped += 1
                continue
            if cut is None:
                raise DataError(
                    f"{where}: prompt + response is {max(len(c), len(r))} tokens, more than --max-length "
                    f"{max_length} (raise --max-length, pass --truncation-mode keep_start|keep_end or --skip-bad-rows)"
                )
            (c, r), prompt_len = cut
        out["chosen"].append(c)
        out["rejected"].append(r)
        out["prompt_len"].append(prompt_len)
        out["prompt_id"].append(prompt_id_of.setdefault(row["prompt"], len(prompt_id_of)))
        out["domain"].append(row["domain"])
        out["margin"].append(float(row.get("margin") or 0.0))
    if merged:
        print(
            f"{source}: in {merged} row(s) the prompt tokenized alone is not a prefix of prompt + response tokenized "
            "as one text (tokens merge across the boundary, e.g. a prompt ending in a space, or a chat template that "
            "renders the prompt differently); the response starts where they diverge, as in TRL"
        )
    if skipped:
        print(
            f"{source}: skipped {skipped} row(s) longer than {max_length} tokens (--truncation-mode {truncation_mode})"
        )
    if not out["chosen"]:
        raise DataError(f"{source}: no rows fit in --max-length {max_length}")
    return out


def load_pairs(
    source: str,
    split: str,
    tokenizer,
    max_length: int,
    skip_bad_rows: bool = False,
    max_rows: Optional[int] = None,
    truncation_mode: str = "error",
):
    """`load_preferences` then `tokenize_preferences`: the rows (strings) and their token ids."""
    rows = ingest.load_preferences(source, split, tokenizer, skip_bad_rows, max_rows)
    return rows, tokenize_preferences(rows, tokenizer, max_length, source, skip_bad_rows, truncation_mode)


# ----------------------------------------------------------------------------------------------
# Sequences: one convention for every script, on both padding sides
# ----------------------------------------------------------------------------------------------
# A sequence is a list of token ids made by `encode_pair`. Batches are padded on either side, and the attention
# mask and position ids always come from the lengths, never from `ids != pad`: a pad id equal to EOS or BOS (GPT-2,
# Llama without a pad token) then hides nothing.


def end_token_id(tokenizer):
    """EOS, or SEP for encoders: the tokenizer's own end token, the first of `end_token_ids`."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    if end is None:
        raise ValueError("the tokenizer has neither an EOS nor a SEP token; generation needs an end token")
    return end


def end_token_ids(tokenizer, model=None) -> list:
    """The tokens a response stops at: TRL's GRPOTrainer's (the tokenizer's end token, then the model's
    `generation_config.eos_token_id`, an id or a list: Llama-3-Instruct's end of text and `<|eot_id|>`), then the
    token the chat template writes right after an assistant's content where that is one of the tokenizer's added
    tokens (`<|im_end|>` for the base Qwen2.5 tokenizer, whose EOS is `<|endoftext|>`)."""
    ids = [end_token_id(tokenizer)]
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_ids if isinstance(config_ids, (list, tuple)) else [config_ids]
    if getattr(tokenizer, "chat_template", None):
        turn_end = encode(tokenizer, ingest.turn_end(tokenizer), chat=True)[:1]
        ids += [i for i in turn_end if i in tokenizer.added_tokens_decoder]
    return list(dict.fromkeys(i for i in ids if i is not None))  # in order, each once


def pad(seqs, pad_id: int, side: str = "right"):
    """Token-id lists as one padded LongTensor (padding on `side`) and the attention mask of the real tokens."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        at = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, at], mask[i, at] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (as `generate` does with left padding)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def _output_layer_from(model, ids: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """The model's output layer run on positions start - 1 .. T - 1 only (its `logits_to_keep`)."""
    keep = ids.shape[1] - start + 1  # (the last position predicts nothing; the caller drops it)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=keep).logits


def next_token_logits(model, ids: torch.Tensor, mask: torch.Tensor, start: int = 1) -> torch.Tensor:
    """The logits that predict ids[:, t] for t >= start, [N, T - start, V], in the model's dtype: the output layer
    runs only at these positions, so a prompt costs no [N, P, V] logits."""
    return _output_layer_from(model, ids, mask, start)[:, :-1]


def token_logprobs(model, ids, mask, start: int = 1, temperature: float = 1.0, entropy: bool = False):
    """log pi(ids[:, t] | ids[:, :t]) for t >= start at `temperature`, in float32 ([N, T - start]); with
    `entropy` (no gradient), also the entropy of each of these next-token distributions.

    The values (and gradients) of `log_softmax(next_token_logits(...).float() / temperature).gather(targets)`,
    computed without ever holding the [N, T - start, V] logits, which decide the memory at real vocabulary sizes:
    for this one call the model's output layer is replaced by logprobs.py's, which computes the logits a chunk of
    positions at a time and keeps only each token's logit - logsumexp (a first reading can skip how)."""
    targets, head = ids[:, start:], logprobs.output_layer(model)
    if head is None:  # logits that are more than the layer (Gemma 2's soft-capping): the model's own, chunked
        return logprobs.of_logits(next_token_logits(model, ids, mask, start), targets, temperature, entropy)
    with logprobs.replacing(head, targets, temperature, entropy):
        out = _output_layer_from(model, ids, mask, start)
    return out.unbind(-1) if entropy else out[..., 0]


@torch.no_grad()
def token_kl(model, reference, ids, mask, start: int = 1, temperature: float = 1.0) -> torch.Tensor:
    """The exact KL(pi || ref) of the next-token distributions at each position t >= start, at `temperature`:
    E_p[x - y] - logsumexp(x) + logsumexp(y) for the two models' logits x and y, a chunk at a time."""
    x_all, y_all = next_token_logits(model, ids, mask, start), next_token_logits(reference, ids, mask, start)
    kl = []
    for t in logprobs.time_chunks(x_all):
        x, y = x_all[:, t].float() / temperature, y_all[:, t].float() / temperature
        kl.append((x.softmax(-1) * (x - y)).sum(-1) - x.logsumexp(-1) + y.logsumexp(-1))
    return torch.cat(kl, 1).clamp(min=0)  # (a KL is >= 0: float32 rounds it to about -1e-7 where pi = ref)


def completion_logprobs(model, seqs, prompt_lens, pad_id: int, side: str = "right"):
    """Per-token log-probs of the completions of `seqs` (after the first prompt_len tokens) and their mask,
    [N, T - 1]; the result is the same with any amount of padding on either side."""
    ids, mask = pad(seqs, pad_id, side)
    ids, mask = ids.to(device_of(model)), mask.to(device_of(model))
    logps = token_logprobs(model, ids, mask)
    first = mask.shape[1] - mask.sum(1) if side == "left" else torch.zeros_like(mask[:, 0])  # first real token
    after_prompt = (
        torch.arange(1, ids.shape[1], device=ids.device)
        >= (first + torch.as_tensor(prompt_lens, device=ids.device))[:, None]
    )
    completion = mask[:, 1:].bool() & after_prompt
    return logps * completion, completion


def sequence_rewards(reward_model, seqs, pad_id: int) -> torch.Tensor:
    """Scores of a sequence-classification model: its own pooling (the last token that is not the pad token,
    or CLS for encoders), so that training, PPO and anyone loading the saved model (RewardBench, TRL) read the
    same token. The same result with any padding, since the mask comes from the lengths."""
    ids, mask = pad(seqs, pad_id)
    return (
        reward_model(input_ids=ids.to(device_of(reward_model)), attention_mask=mask.to(device_of(reward_model)))
        .logits.squeeze(-1)
        .float()
    )


def sampling_config(
    tokenizer,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
    top_p: float = 1.0,
    top_k: int = 0,
    model=None,
):
    """Sampling at `temperature`, truncated to the `top_k` most likely tokens (0: all) and to the smallest set of
    probability >= `top_p` (1.0: all), or greedy, stopping at any of `end_token_ids(tokenizer, model)`. By default no
    truncation, so that the log-probs computed at the same temperature are those of the distribution the tokens were
    sampled from. With truncation they are not: the scripts still compute log-probs from the full logits at the
    temperature, as TRL's GRPOTrainer does."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    sampling = dict(do_sample=False) if greedy else sampling
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_token_ids(tokenizer, model),
        **sampling,
    )


@torch.no_grad()
def generate(model, prompt_ids, pad_id: int, end_id, generation_config):
    """Responses to prompts (lists of ids), cut after the first end token (`end_id`: an id or a list of them, e.g.
    `end_token_ids`). Returns the prompts left-padded and the responses right-padded to max_new_tokens, as `ids` and
    `mask` [N, P + max_new_tokens], the response tokens and their mask [N, max_new_tokens], and whether each response
    ended with an end token."""
    queries, query_mask = pad(prompt_ids, pad_id, side="left")
    queries, query_mask = queries.to(device_of(model)), query_mask.to(device_of(model))
    out = model.generate(
        input_ids=queries,
        attention_mask=query_mask,
        generation_config=generation_config,
        synced_gpus=is_sharded(model),  # sharded: every process runs every forward until all have stopped
    )
    responses = F.pad(
        out[:, queries.shape[1] :],
        (0, generation_config.max_new_tokens - out.shape[1] + queries.shape[1]),
        value=pad_id,
    )
    responses, response_mask, ended = cut_at_end(responses, end_id, pad_id)
    return (
        torch.cat([queries, responses], 1),
        torch.cat([query_mask, response_mask], 1),
        responses,
        response_mask,
        ended,
    )


def cut_at_end(responses: torch.Tensor, end_id, pad_id: int):
    """Generated tokens cut after the first end token (kept; `end_id`: an id or a list of them): the responses padded
    after it, their mask (from the cut, so a sampled pad token before it stays real) and whether each one ended."""
    is_end = torch.isin(responses, torch.as_tensor(end_id, device=responses.device))
    ended = is_end.any(1)
    last = torch.where(ended, is_end.long().argmax(1), responses.shape[1] - 1)
    mask = (torch.arange(responses.shape[1], device=responses.device)[None] <= last[:, None]).long()
    return responses.masked_fill(mask == 0, pad_id), mask, ended


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi: exp(d) - 1 - d with
    d = ref_logp - logp (Schulman's k3), unbiased and never negative; in float64 (no cancellation near d = 0)."""
    d = (ref_logp - logp).double()
    return (torch.expm1(d) - d).clamp(min=0.0).to(logp.dtype)  # the clamp removes rounding below 0


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def is_sharded(model) -> bool:
    """Whether the model is sharded over the processes by --fsdp (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ----------------------------------------------------------------------------------------------
# Training: batch order and sharding, the supervised warm start
# ----------------------------------------------------------------------------------------------


def batch_indices(n: int, batch_size: int, seed: int, what: str = "rows"):
    """Global batches of row indices, epoch after epoch: each epoch a permutation seeded with seed + epoch (the same
    on every rank), cut into full batches (the rest of an epoch is dropped). Fewer rows than a batch is an error."""
    if n < batch_size:
        raise DataError(
            f"the training data has {n} {what}, fewer than one batch of {batch_size}; lower the batch size or add data"
        )

    def epochs():
        for epoch in itertools.count():
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            for i in range(0, n - batch_size + 1, batch_size):
                yield order[i : i + batch_size]

    return epochs()


def shard(batch: list, rank: int, world: int) -> list:
    """This process's contiguous share of a global batch."""
    per = len(batch) // world
    return batch[rank * per : (rank + 1) * per]


def warm_start(model, seqs, prompt_lens, pad_id, steps, batch_size, lr, seed, rank=0, world=1, tracker=None):
    """Supervised fine-tuning of a (tiny, randomly initialised) policy on completions: the mean next-token loss of
    the completion tokens, AdamW with cosine decay to 0. `model` may be a DDP wrapper (each rank takes its shard)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    batches = batch_indices(len(seqs), batch_size, seed, "warm-start sequences")
    for step in tqdm(range(steps), disable=rank != 0, desc="warm start"):
        idx = shard(next(batches), rank, world)
        logps, mask = completion_logprobs(model, [seqs[i] for i in idx], [prompt_lens[i] for i in idx], pad_id)
        loss = -logps.sum() / mask.sum()
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"warm-start step {step}: the loss is {loss.item()}; nothing was saved (--sft-learning-rate too high?)"
            )
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.scalars({"losses/sft_loss": loss.item()}, step)


# ----------------------------------------------------------------------------------------------
# The tiny offline model (lifecycle.py loads the ones users bring)
# ----------------------------------------------------------------------------------------------


def tiny_tokenizer():
    """A byte-level tokenizer that needs no files (pad 0, eos 1)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def tiny_config(tokenizer, num_labels: Optional[int] = None, layers: int = 2, hidden: int = 128):
    """A small Llama config for the embedded task (a few hundred thousand parameters)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if num_labels is not None:
        config.num_labels = num_labels
    return config


# ----------------------------------------------------------------------------------------------
# Evaluation: the per-domain reports
# ----------------------------------------------------------------------------------------------


def domain_report(values, domains, name: str = "accuracy") -> dict:
    """Mean of `values` overall and per domain, and the worst domain, in the metrics.jsonl schema."""
    per = {}
    for v, d in zip(values, domains):
        per.setdefault(d, []).append(float(v))
    means = {d: sum(v) / len(v) for d, v in sorted(per.items())}
    return {
        name: sum(map(float, values)) / len(values),
        f"worst_domain_{name}": min(means.values()),
        f"domain_{name}": means,
    }


def print_table(results: dict, name: str = "accuracy"):
    """One line per split: each domain, the mean over the domains (the figure the README and results tables call
    "mean"), the mean over all rows (metrics.jsonl's value of that name: `accuracy`, `gold_reward`) and the worst
    domain (in %)."""
    domains = sorted({d for r in results.values() for d in r[f"domain_{name}"]})
    pct = 100 if name == "accuracy" else 1
    print(f"{'split':<16}" + "".join(f"{d:>11}" for d in domains) + f"{'domain mean':>13}{'all rows':>10}{'worst':>9}")
    for split, r in results.items():
        per, digits = r[f"domain_{name}"], 1 if pct == 100 else 3
        cells = "".join(f"{pct * per[d]:>11.{digits}f}" if d in per else f"{'-':>11}" for d in domains)
        mean, rows, worst = sum(per.values()) / len(per), r[name], r[f"worst_domain_{name}"]
        print(f"{split:<16}{cells}{pct * mean:>13.{digits}f}{pct * rows:>10.{digits}f}{pct * worst:>9.{digits}f}")
