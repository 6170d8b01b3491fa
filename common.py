"""Small utilities shared by dro_reward.py, dro_dpo.py and dro_ppo.py.

Only what more than one script needs lives here: the worst-case weights of the ambiguity sets, the
embedded synthetic benchmark, preference data loading and tokenisation, the tiny offline model, the memory
savers and sharding (LoRA, checkpointing, FSDP2), checkpoints and per-domain evaluation reports. Everything
else stays inside the script that uses it.
"""

import contextlib
import copy
import itertools
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import get_scheduler

# ----------------------------------------------------------------------------------------------
# Robust weights: the worst-case prompt distribution q* of a minibatch
# ----------------------------------------------------------------------------------------------

DRO_KINDS = ("erm", "tv", "chi2", "kl", "cvar")


@dataclass
class DROArgs:
    kind: Literal["erm", "tv", "chi2", "kl", "cvar", "group"] = "chi2"
    """ambiguity set around the uniform distribution over the prompts of a batch (group: over the known domains)"""
    rho: float = 0.5
    """radius (tv: total variation in [0, 1]; chi2: (1/2B) sum (Bq-1)^2; kl: KL(q||u); cvar: q_i <= (1+rho)/B)"""
    group_step: float = 0.01
    """group only: step size of the exponentiated-gradient update of the domain weights (Sagawa et al. 2020)"""

    def __post_init__(self):
        if self.kind not in DRO_KINDS + ("group",):
            raise ValueError(f"--dro.kind must be one of {DRO_KINDS + ('group',)}, got {self.kind!r}")
        if not math.isfinite(self.rho) or self.rho < 0:
            raise ValueError(f"--dro.rho must be a finite number >= 0, got {self.rho}")
        if self.kind == "tv" and self.rho > 1:
            raise ValueError(f"--dro.rho must be in [0, 1] for --dro.kind tv (a total variation), got {self.rho}")
        if not math.isfinite(self.group_step) or self.group_step < 0:
            raise ValueError(f"--dro.group-step must be a finite number >= 0, got {self.group_step}")


@dataclass
class GroupWeights:
    """Group DRO's state (Sagawa et al. 2020): a weight per known domain, carried from batch to batch."""

    names: list
    weights: torch.Tensor

    @classmethod
    def start(cls, dro: DROArgs, domains) -> Optional["GroupWeights"]:
        """Uniform weights over the domains of the training data for --dro.kind group (None for the other kinds)."""
        if dro.kind != "group":
            return None
        names = sorted(set(domains))
        if len(names) < 2:
            raise ArgumentError(
                f"--dro.kind group needs a `domain` column with at least two domains; the training "
                f"data has {names} (rows without one are domain 'all')"
            )
        return cls(names, torch.full((len(names),), 1.0 / len(names), dtype=torch.float64))

    def update(self, group_losses: torch.Tensor, step: float):
        """q_g <- q_g exp(step * loss_g), normalised; a domain absent from the batch has loss 0 (Sagawa's code)."""
        self.weights = self.weights * torch.exp(step * group_losses)
        self.weights = self.weights / self.weights.sum()


def check_args(args, positive: str = "", non_negative: str = "", fraction: str = ""):
    """Raise a ValueError naming the first field in `positive` (space-separated names) that is not > 0, in
    `non_negative` that is < 0, or in `fraction` outside [0, 1) (None means "not set" and passes); called in the
    scripts' Args.__post_init__, so tyro reports it at parse time with the flag's name."""
    for names, bad, allowed in (
        (positive, lambda v: v <= 0, "> 0"),
        (non_negative, lambda v: v < 0, ">= 0"),
        (fraction, lambda v: not 0 <= v < 1, "in [0, 1)"),
    ):
        for name in names.split():
            value = getattr(args, name)
            if value is not None and (bad(value) or (isinstance(value, float) and not math.isfinite(value))):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {allowed}, got {value}")
    if args.fsdp and args.lora_r:
        raise ValueError("--fsdp with --lora-r is not supported yet: LoRA models are trained replicated (DDP)")


def robust_weights(losses: torch.Tensor, kind: str, rho: float, return_dual: bool = False):
    """Worst-case weights q* = argmax_{q in Q_rho} sum_i q_i * losses_i over the B entries of `losses`.

    Exact maximisers (kl: to 1e-10 in the divergence), computed in float64 without gradient in a few
    O(B) passes (selection, not sorting), no Python loop over B; finite for any finite losses, up to spreads
    of the whole float64 range. Entries with equal losses always get equal weights. With `return_dual`, also
    returns the dual variable (tv: the rho-quantile eta; chi2: the threshold eta; kl: the temperature tau; else nan).
    """
    if kind not in DRO_KINDS:
        raise ValueError(f"unknown DRO kind {kind!r}; expected one of {DRO_KINDS}")
    if not math.isfinite(rho) or rho < 0 or (kind == "tv" and rho > 1):
        raise ValueError(f"invalid radius rho={rho} for kind {kind!r}: a finite number >= 0 (tv: in [0, 1])")
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty 1-D tensor, got shape {tuple(losses.shape)}")
    x = losses.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("robust_weights got a NaN or infinite loss")
    B = x.numel()
    top, scale = x.max(), 1.0
    x = x - top  # equivariance to shifts, and no overflow anywhere below
    if not math.isfinite(x.min().item()):  # a spread beyond the float64 range: halve (q* is scale-invariant)
        x, top, scale = (losses.detach().to(torch.float64) / 2 - top / 2), top / 2, 2.0
    at_max = x == 0
    dual = float("nan")
    if kind == "erm" or rho == 0 or B == 1 or bool(at_max.all()):
        q = torch.full_like(x, 1.0 / B)
    elif kind == "tv":
        q, eta = _tv(x, at_max, rho)
        dual = scale * (eta + top.item())
    elif kind == "cvar":
        q = _cvar(x, rho)
    elif kind == "chi2":
        q, eta = _chi2(x, at_max, rho)
        dual = scale * (eta + top.item())
    else:
        q, tau = _kl(x, at_max, rho)
        dual = scale * tau
    q = q / q.sum()
    return (q, dual) if return_dual else q


def _tv(x, at_max, rho):
    # Take mass rho from the smallest losses (each down to 0), give it to the largest (shared by ties).
    B = x.numel()
    m = min(rho, 1.0)
    j = min(int(math.floor(m * B)), B - 1)  # the (j+1)-th smallest loss is the partially emptied one
    eta = torch.kthvalue(x, j + 1).values
    below, at = x < eta, x == eta
    removed_at = (m - below.sum().item() / B) / at.sum().item()  # mass each tie at eta gives up
    q = torch.full_like(x, 1.0 / B)
    q[below] = 0.0
    q[at] = max(1.0 / B - removed_at, 0.0)
    q[at_max] += (1.0 - q.sum()) / at_max.sum()
    return q, eta.item()


def _cvar(x, rho):
    # Fill the largest losses up to the cap (1 + rho) / B until the mass is spent; ties share.
    B = x.numel()
    cap = min((1.0 + rho) / B, 1.0)
    n = min(max(int(math.ceil(1.0 / cap)), 1), B)  # how many losses get mass
    b = torch.kthvalue(x, B - n + 1).values  # n-th largest loss
    above, at = x > b, x == b
    q = torch.zeros_like(x)
    q[above] = cap
    q[at] = max(1.0 - cap * above.sum().item(), 0.0) / at.sum().item()
    return q.clamp(max=cap)


def _chi2(x, at_max, rho, iters=100):
    # q_i proportional to (x_i - eta)_+ with eta such that (1/2B) sum (B q_i - 1)^2 = rho (Levy et al. 2020).
    # For a fixed active set {x > eta} of size k the equation is a quadratic in eta, solved in closed
    # form. Starting from all losses, the active set shrinks to the support of q* (as in Michelot's
    # simplex projection), in a handful of O(B) passes. Where rounding defeats the closed form (losses
    # spread over many orders of magnitude), a bisection on eta, which cannot fail, takes over.
    B = x.numel()
    c = 1.0 + 2.0 * rho  # the constraint in the form B * sum q_i^2 = c
    if B * 1.0 / at_max.sum().item() <= c:  # even the point mass on the maxima is inside the set
        return at_max.to(x.dtype), 0.0
    active = torch.ones_like(x, dtype=torch.bool)
    for _ in range(iters):
        k = active.sum().item()
        mean = (x * active).sum() / k
        denom = c / B - 1.0 / k  # > 0 in exact arithmetic: the support of q* has more than B / c losses
        if denom <= 0:
            return _chi2_bisection(x, c)
        eta = mean - torch.sqrt((((x - mean) * active) ** 2).sum() / denom) / k
        new_active = x > eta
        if torch.equal(new_active, active):
            break
        active = new_active
    q = (x - eta).clamp(min=0.0)
    if not (
        math.isfinite(eta.item())
        and 0 < q.sum().item() < math.inf
        and abs(B * (q / q.sum()).square().sum().item() - c) <= 1e-6 * c
    ):
        return _chi2_bisection(x, c)
    return q, eta.item()


def _chi2_bisection(x, c, iters=200):
    # f(eta) = B sum (x - eta)_+^2 / (sum (x - eta)_+)^2 grows from 1 (eta -> -inf) to B / #maxima > c (eta -> 0):
    # bisect for f(eta) = c on losses scaled to [-1, 0], keeping the side where the constraint holds.
    B, scale = x.numel(), -x.min()
    y = x / scale

    def f(eta):
        p = (y - eta).clamp(min=0.0)
        return B * (p / p.sum()).square().sum().item()

    lo, hi = -1.0, 0.0
    while f(lo) > c:  # f -> 1 as eta -> -inf
        lo = 2.0 * lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) <= c else (lo, mid)
    return (y - lo).clamp(min=0.0), lo * scale.item()


def _kl(x, at_max, rho, iters=1100):
    # q_i proportional to exp(x_i / tau), tau such that KL(q || uniform) = rho. We solve for
    # beta = 1 / tau with Newton steps safeguarded by bisection: dKL/dbeta = beta * Var_q(x) >= 0.
    B = x.numel()
    if math.log(B / at_max.sum().item()) <= rho:  # the point mass on the maxima is inside the set
        return at_max.to(x.dtype), 0.0
    scale = -x.min()  # losses now lie in [-scale, 0] with scale > 0
    y = x / scale

    def kl_and_slope(beta):
        e = torch.exp(beta * y)  # y <= 0 with max 0: no overflow, and the sum is >= 1
        total = e.sum()
        mean = (e * y).sum() / total
        kl = beta * mean - torch.log(total) + math.log(B)
        return kl.item(), beta * ((e * (y - mean) ** 2).sum() / total).item()

    lo, hi = 0.0, math.inf
    beta = math.sqrt(2.0 * rho / y.var(unbiased=False).item())  # KL ~ beta^2 Var(y) / 2 for small beta
    for _ in range(iters):
        kl, slope = kl_and_slope(beta)
        if abs(kl - rho) <= 1e-10 * max(1.0, rho):
            break
        lo, hi = (beta, hi) if kl < rho else (lo, beta)
        step = beta - (kl - rho) / slope if slope > 0 else math.nan
        beta = step if lo < step < hi else (0.5 * (lo + hi) if hi < math.inf else 2.0 * beta)
    if kl - rho > 1e-10 * max(
        1.0, rho
    ):  # not converged (near-ties at a tiny fraction of the spread): the feasible side
        beta = lo
    q = torch.softmax(beta * y, 0)
    return q, scale.item() / beta if beta > 0 else math.inf


def robust_prompt_weights(losses: torch.Tensor, prompt_ids: torch.Tensor, dro: DROArgs, groups=None, domains=None):
    """The worst case over the prompts of the *global* batch, as a weight for each of this process's losses.

    `losses` are this process's detached losses (one per pair or rollout), `prompt_ids` the prompt of each. Under
    torch.distributed the losses of all ranks are gathered first, so the worst case is over the whole batch. A
    prompt's loss is the mean of its losses, q* is computed over prompts, and each loss gets q*_prompt / (number
    of losses of that prompt): the weights of all ranks sum to 1. Returns (weights, dict of diagnostics).
    With --dro.kind group, `groups` (GroupWeights) is updated with the mean prompt loss of each domain (`domains`:
    the domain of each loss) and each prompt gets its domain's weight / the domain's number of prompts.
    """
    losses = losses.detach().float()
    domain_ids = torch.tensor([groups.names.index(d) for d in domains], device=losses.device) if groups else prompt_ids
    all_losses, all_ids, all_domains, offset = losses, prompt_ids, domain_ids, 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world, rank = dist.get_world_size(), dist.get_rank()
        gathered = [[torch.empty_like(t) for _ in range(world)] for t in (losses, prompt_ids, domain_ids)]
        for out, t in zip(gathered, (losses, prompt_ids, domain_ids)):
            dist.all_gather(out, t)
        (all_losses, all_ids, all_domains), offset = [torch.cat(g) for g in gathered], rank * losses.numel()
    _, inverse, counts = torch.unique(all_ids, return_inverse=True, return_counts=True)
    prompt_losses = torch.zeros(len(counts), dtype=torch.float64, device=losses.device)
    prompt_losses.index_add_(0, inverse, all_losses.double())
    prompt_losses /= counts
    stats = {}
    if groups is None:
        q, dual = robust_weights(prompt_losses, dro.kind, dro.rho, return_dual=True)
    else:  # the EG update on the per-domain mean prompt losses, then each prompt's share of its domain's weight
        prompt_domain = torch.zeros(len(counts), dtype=torch.long, device=losses.device)
        prompt_domain[inverse] = all_domains
        n = torch.bincount(prompt_domain, minlength=len(groups.names)).double()
        group_losses = torch.zeros(len(groups.names), dtype=torch.float64, device=losses.device)
        group_losses.index_add_(0, prompt_domain, prompt_losses)
        group_losses /= n.clamp(min=1)
        groups.update(group_losses.cpu(), dro.group_step)
        q, dual = (groups.weights.to(losses.device) / n.clamp(min=1))[prompt_domain], float("nan")
        for name, w, gl, present in zip(groups.names, groups.weights.tolist(), group_losses.tolist(), n.tolist()):
            stats[f"dro/group_weight/{name}"] = w
            stats[f"dro/group_loss/{name}"] = gl if present else float("nan")
    weights = (q / counts)[inverse]
    stats.update(
        {
            "dro/robust_loss": (q * prompt_losses).sum().item(),
            "dro/erm_loss": prompt_losses.mean().item(),
            "dro/max_weight_x_B": q.max().item() * len(q),
            "dro/ess_fraction": q.sum().item() ** 2 / (q.square().sum().item() * len(q)),
            "dro/dual": dual,
        }
    )
    return weights[offset : offset + losses.numel()].to(losses.dtype), stats


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


EMBEDDED = {
    "synthetic": (SYNTHETIC_SPLITS, synthetic_preferences),
    "synthetic-groups": (GROUPS_SPLITS, group_preferences),
}
"""The embedded datasets by their --dataset name: (splits, row generator)."""


# ----------------------------------------------------------------------------------------------
# Preference data: the embedded task, local files and the hub datasets of the paper
# ----------------------------------------------------------------------------------------------

REWARDBENCH_SECTIONS = {
    "chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "chat_hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
_SECTION_OF = {subset: section for section, subsets in REWARDBENCH_SECTIONS.items() for subset in subsets}
HHH_CONFIGS = ("harmless", "helpful", "honest", "other")


class UserError(ValueError):
    """A mistake in the command line or the data: the scripts print its message alone and exit with code 2."""


class DataError(UserError):
    """Bad input data; the message names the source and the row or line."""


class ArgumentError(UserError):
    """A bad command-line argument found after parsing (e.g. a batch that does not split over the processes)."""


def exit_cleanly_on_user_errors():
    """Make an uncaught UserError print `error: <message>` and exit with code 2, without a traceback; any other
    exception (a bug) keeps its traceback."""
    import sys

    def hook(kind, error, traceback):
        if issubclass(kind, UserError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        sys.__excepthook__(kind, error, traceback)

    sys.excepthook = hook


LOCAL_FORMATS = (".json", ".jsonl", ".parquet", ".csv")


def _is_local(source: str) -> bool:
    """A path rather than a hub name (which is "name" or "owner/name")."""
    return (
        os.path.exists(source)
        or source.lower().endswith(LOCAL_FORMATS)
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
    )


def _read_file(path: str, skip_bad_rows: bool):
    """The rows of a local json (a list of objects), jsonl (an object per line), parquet or csv file, read by the
    project so that every problem is a DataError naming the file and the line or row: [(where, row), ...]."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_FORMATS:
        raise DataError(f"{path}: unknown file type {ext or '(none)'!r}; expected one of {', '.join(LOCAL_FORMATS)}")
    rows, bad = [], 0
    if ext == ".jsonl":
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                    if not isinstance(row, dict):
                        raise ValueError(f"a line must be a JSON object, got {type(row).__name__}")
                except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
                    if not skip_bad_rows:
                        raise DataError(f"{path}, line {number}: {e}") from None
                    bad += 1
                    continue
                rows.append((f"{path}, line {number}", row))
    else:
        try:
            if ext == ".json":
                with open(path, "rb") as f:
                    table = json.loads(f.read().decode("utf-8"))
                if not isinstance(table, list):
                    raise DataError(f"{path}: expected a JSON list of objects, got {type(table).__name__}")
            elif ext == ".csv":
                import csv

                with open(path, newline="", encoding="utf-8") as f:
                    table = list(csv.DictReader(f))
            else:
                import pyarrow.parquet

                table = pyarrow.parquet.read_table(path).to_pylist()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e})") from None
        except Exception as e:  # pyarrow's errors for a file that is not parquet
            raise DataError(f"{path}: not a readable {ext[1:]} file ({type(e).__name__}: {e})") from None
        rows = [(f"{path}, row {i}", row) for i, row in enumerate(table)]
    if bad:
        print(f"{path}: skipped {bad} unreadable line(s) (--skip-bad-rows)")
    return rows


def load_raw(source: str, split: Optional[str], skip_bad_rows: bool = False):
    """The rows of a source in its own schema, as [(where, row), ...] (`where` names the source and the row or line
    for error messages): a local file or folder of files, a folder saved by `datasets`, or a hub dataset."""
    import datasets

    if _is_local(source):
        if split not in (None, "train"):
            raise ArgumentError(
                f"{source}: a local file has no splits (got split {split!r}); "
                f"--dataset-split and ':split' apply to hub datasets and the synthetic task"
            )
        if not os.path.exists(source):
            raise DataError(f"{source}: no such file or folder")
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")):
            raise DataError(f"{source}: a DatasetDict folder; pass one of its split folders")
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "state.json")):  # Dataset.save_to_disk
            return [(f"{source}, row {i}", row) for i, row in enumerate(datasets.load_from_disk(source))]
        if os.path.isdir(source):
            files = sorted(os.path.join(source, f) for f in os.listdir(source) if f.lower().endswith(LOCAL_FORMATS))
            if not files:
                raise DataError(f"{source}: a folder with no {'/'.join(LOCAL_FORMATS)} file")
            return [r for path in files for r in _read_file(path, skip_bad_rows)]
        return _read_file(source, skip_bad_rows)
    try:
        if "hhh_alignment" in source:
            parts = [datasets.load_dataset(source, c, split=split or "test") for c in HHH_CONFIGS]
            raw = datasets.concatenate_datasets(
                [p.add_column("domain", [c] * len(p)) for p, c in zip(parts, HHH_CONFIGS)]
            )
        elif "Unified-Feedback" in source:
            raw = datasets.load_dataset(source, "all", split=split or "train")
        elif "reward-bench" in source:
            raw = datasets.load_dataset(source, split=split or "filtered")
        else:
            raw = datasets.load_dataset(source, split=split or "test")
    except Exception as e:  # not found, offline, no such split: the user's input, not a bug here
        raise DataError(f"{source}: could not load it as a hub dataset ({type(e).__name__}: {str(e)[:300]})") from None
    return [(f"{source}, row {i}", row) for i, row in enumerate(raw)]


def render(messages, tokenizer, add_generation_prompt: bool) -> str:
    """A conversation as text: the tokenizer's chat template, or plain `role: content` lines without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def _conversation_to_strings(prompt_msgs, responses, tokenizer, where):
    """Render prompt messages and each final assistant message; the response is what the template adds."""
    prompt = render(prompt_msgs, tokenizer, add_generation_prompt=True)
    out = []
    for response in responses:
        if not isinstance(response, list) or not response or not isinstance(response[-1], dict):
            raise DataError(f"{where}: a response must be a non-empty list of messages, got {type(response).__name__}")
        content = response[-1].get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: empty or non-string final message")
        full = render(list(prompt_msgs) + list(response), tokenizer, add_generation_prompt=False)
        if not full.startswith(prompt):  # a template that rewrites earlier turns: fall back to the message
            full = prompt + content
        out.append(full[len(prompt) :])
    return prompt, out


def to_preference(row: dict, tokenizer, where: str) -> dict:
    """One row of any supported schema -> {prompt, chosen, rejected, domain} as strings."""
    if {"conv_A", "conv_B", "conv_A_rating", "conv_B_rating"} <= row.keys():  # Unified-Feedback
        a, b = row["conv_A"], row["conv_B"]
        if row["conv_A_rating"] == row["conv_B_rating"]:
            return None  # a tie carries no preference (the paper's code filters these too)
        if a[:-1] != b[:-1]:
            raise DataError(f"{where}: conv_A and conv_B do not share the same prompt turns")
        chosen, rejected = (a, b) if row["conv_A_rating"] > row["conv_B_rating"] else (b, a)
        prompt, (c, r) = _conversation_to_strings(a[:-1], [chosen[-1:], rejected[-1:]], tokenizer, where)
        return {"prompt": prompt, "chosen": c, "rejected": r, "domain": row.get("source") or "all"}
    if {"input", "targets"} <= row.keys():  # HHH-alignment: the choice labelled 1 is preferred
        choices, labels = row["targets"]["choices"], row["targets"]["labels"]
        if len(choices) != 2 or sorted(labels) != [0, 1]:
            raise DataError(f"{where}: expected two choices labelled 1 and 0, got labels {labels}")
        best = labels.index(1)
        prompt, (c, r) = _conversation_to_strings(
            [{"role": "user", "content": row["input"]}],
            [[{"role": "assistant", "content": choices[best]}], [{"role": "assistant", "content": choices[1 - best]}]],
            tokenizer,
            where,
        )
        return {"prompt": prompt, "chosen": c, "rejected": r, "domain": row.get("domain") or "hhh"}
    missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; found {sorted(k for k, v in row.items() if v is not None)}. "
            "Expected prompt/chosen/rejected, Unified-Feedback (conv_A/conv_B/ratings) or HHH (input/targets)"
        )
    domain = _SECTION_OF.get(row.get("subset"), row.get("subset")) or row.get("domain") or "all"
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(chosen, list):  # conversational; an implicit prompt is the shared leading turns
        if prompt is None:
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt, (chosen, rejected) = _conversation_to_strings(prompt, [chosen, rejected], tokenizer, where)
    if not isinstance(prompt, str):
        raise DataError(f"{where}: missing or non-string 'prompt' (got {type(prompt).__name__})")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: {key!r} must be a non-empty string, got {value!r:.40}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "domain": str(domain)}


def load_preferences(
    source: str, split: Optional[str], tokenizer, skip_bad_rows: bool = False, max_rows: Optional[int] = None
):
    """Preference rows {prompt, chosen, rejected, domain, row, where} as a `datasets.Dataset` (`row`: the index in
    the source, `where`: the source and row or line, for error messages).

    `source` is "synthetic" or "synthetic-groups" (the embedded datasets, with their splits), a hub name, or a local
    file or folder. A bad row raises a DataError naming the source and the row, or, with `skip_bad_rows`, is
    skipped and counted.
    """
    import datasets

    if source in EMBEDDED:
        splits, make_rows = EMBEDDED[source]
        if split not in splits:
            raise DataError(f"{source} has splits {list(splits)}, not {split!r}")
        mixture, n, offset = splits[split]
        raw = [(f"{source} {split}, row {i}", row) for i, row in enumerate(make_rows(n, mixture, seed=1000 + offset))]
    else:
        raw = load_raw(source, split, skip_bad_rows)
    if not raw:
        raise DataError(f"{source}: no rows (an empty file?)")
    rows, skipped = [], 0
    for i, (where, row) in enumerate(raw[:max_rows]):
        try:
            if not isinstance(row, dict):
                raise DataError(
                    f"{where}: a row must be an object with prompt/chosen/rejected, got {type(row).__name__}"
                )
            pref = to_preference(row, tokenizer, where)
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        if pref is not None:
            rows.append({**pref, "row": i, "where": where})
    if skipped:
        print(f"{source}: skipped {skipped} bad row(s) of {len(raw[:max_rows])} (--skip-bad-rows)")
    if not rows:
        raise DataError(f"{source}: no usable preference rows")
    return datasets.Dataset.from_list(rows)


def tokenize_preferences(ds, tokenizer, max_length: int, source: str, skip_bad_rows: bool = False):
    """Token ids of prompt+chosen and prompt+rejected (`encode_prompt` + `encode_response`), the prompt length, an
    integer prompt id per row (rows that share a prompt share it) and the domain. Never truncates: a row longer
    than `max_length` raises a DataError naming the row, or is skipped with `skip_bad_rows`."""
    prompt_id_of, out, skipped = {}, {"chosen": [], "rejected": [], "prompt_len": [], "prompt_id": [], "domain": []}, 0
    for row in ds:
        where = row["where"]
        prompt = encode_prompt(tokenizer, row["prompt"], where)
        seqs = [prompt + encode_response(tokenizer, row[k], where) for k in ("chosen", "rejected")]
        longest = max(map(len, seqs))
        if longest > max_length:
            if skip_bad_rows:
                skipped += 1
                continue
            raise DataError(
                f"{where}: prompt + response is {longest} tokens, more than --max-length "
                f"{max_length} (rows are never truncated; raise --max-length or pass --skip-bad-rows)"
            )
        out["chosen"].append(seqs[0])
        out["rejected"].append(seqs[1])
        out["prompt_len"].append(len(prompt))
        out["prompt_id"].append(prompt_id_of.setdefault(row["prompt"], len(prompt_id_of)))
        out["domain"].append(row["domain"])
    if skipped:
        print(f"{source}: skipped {skipped} row(s) longer than {max_length} tokens (--skip-bad-rows)")
    if not out["chosen"]:
        raise DataError(f"{source}: no rows fit in --max-length {max_length}")
    return out


def load_pairs(
    source: str, split: str, tokenizer, max_length: int, skip_bad_rows: bool = False, max_rows: Optional[int] = None
):
    """`load_preferences` then `tokenize_preferences`: the rows (strings) and their token ids."""
    rows = load_preferences(source, split, tokenizer, skip_bad_rows, max_rows)
    return rows, tokenize_preferences(rows, tokenizer, max_length, source, skip_bad_rows)


# ----------------------------------------------------------------------------------------------
# Sequences: one convention for every script, on both padding sides
# ----------------------------------------------------------------------------------------------
# A sequence is a list of token ids: start token, prompt, response, end token. Batches are padded on either
# side, and the attention mask and position ids always come from the lengths, never from `ids != pad`: a pad
# id equal to EOS or BOS (GPT-2, Llama without a pad token) then hides nothing.


def start_token_id(tokenizer):
    """BOS, or CLS for encoders (BERT-style reward models); None when the tokenizer has neither."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(tokenizer, "cls_token_id", None)


def end_token_id(tokenizer):
    """EOS, or SEP for encoders: the token every training sequence ends with and every rollout stops at."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    if end is None:
        raise ValueError("the tokenizer has neither an EOS nor a SEP token; sequences need an end token")
    return end


def encode_prompt(tokenizer, prompt: str, where: str = "a prompt") -> list:
    """Token ids of a prompt, starting with the start token (once, even when a chat template already wrote it)."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    start = start_token_id(tokenizer)
    if start is not None and ids[:1] != [start]:
        ids = [start] + ids
    if len(ids) <= (start is not None):
        raise DataError(f"{where}: the prompt {prompt!r:.40} tokenizes to nothing (is the tokenizer the model's own?)")
    return ids


def encode_response(tokenizer, response: str, where: str = "a response") -> list:
    """Token ids of a response ending with the end token exactly once: a chat template that already ends the
    turn with it (e.g. `<|im_end|>` then a newline) is cut after it, anything else gets it appended."""
    ids, end = tokenizer(response, add_special_tokens=False).input_ids, end_token_id(tokenizer)
    last = len(ids) - 1 - ids[::-1].index(end) if end in ids else None
    if last is not None and not tokenizer.decode(ids[last + 1 :]).strip():
        ids = ids[: last + 1]  # the template ended the turn: keep its end token, drop the whitespace after it
    else:
        ids = ids + [end]
    if len(ids) < 2:
        raise DataError(
            f"{where}: the response {response!r:.40} tokenizes to nothing (is the tokenizer the model's own?)"
        )
    return ids


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


def token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, start: int = 1, temperature: float = 1.0):
    """log pi(ids[:, t] | ids[:, :t]) for t >= start, at `temperature`, and the logits that predict them."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    logits = logits[:, start - 1 : -1].float() / temperature
    return torch.gather(F.log_softmax(logits, -1), 2, ids[:, start:, None]).squeeze(-1), logits


def completion_logprobs(model, seqs, prompt_lens, pad_id: int, side: str = "right"):
    """Per-token log-probs of the completions of `seqs` (after the first prompt_len tokens) and their mask,
    [N, T - 1]; the result is the same with any amount of padding on either side."""
    ids, mask = pad(seqs, pad_id, side)
    ids, mask = ids.to(device_of(model)), mask.to(device_of(model))
    logps, _ = token_logprobs(model, ids, mask)
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


@torch.no_grad()
def generate(model, prompt_ids, pad_id: int, end_id: int, generation_config):
    """Responses to prompts (lists of ids), cut after the first end token. Returns the prompts left-padded and the
    responses right-padded to max_new_tokens, as `ids` and `mask` [N, P + max_new_tokens], the response tokens and
    their mask [N, max_new_tokens], and whether each response ended with the end token."""
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


def cut_at_end(responses: torch.Tensor, end_id: int, pad_id: int):
    """Generated tokens cut after the first end token (kept): the responses padded after it, their mask (from the
    cut, so a sampled pad token before it stays real) and whether each one ended."""
    is_end = responses == end_id
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


def warm_start(
    model,
    seqs,
    prompt_lens,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    rank: int = 0,
    world: int = 1,
    tracker=None,
):
    """Supervised fine-tuning of a (tiny, randomly initialised) policy on completions: the mean next-token loss of
    the completion tokens, AdamW with cosine decay to 0. `model` may be a DDP wrapper (each rank takes its shard)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    batches = batch_indices(len(seqs), batch_size, seed, "warm-start sequences")
    for step in tqdm(range(steps), disable=rank != 0, desc="warm start"):
        idx = shard(next(batches), rank, world)
        logps, mask = completion_logprobs(model, [seqs[i] for i in idx], [prompt_lens[i] for i in idx], pad_id)
        loss = -logps.sum() / mask.sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"warm-start step {step}: the loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.scalars({"losses/sft_loss": loss.item()}, step)


# ----------------------------------------------------------------------------------------------
# Models and tokenizers: the tiny offline default and the ones users bring
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


def check_model_path(path: str, flag: str):
    """A clear error for a local model folder that is not there (instead of the hub client's repo-id message)."""
    if _is_local(path) and not os.path.isdir(path):
        raise ArgumentError(f"{flag} {path}: no such folder")


def load_tokenizer(args):
    """The tokenizer of --tokenizer-name-or-path or of the model (pad = EOS where it has no pad token), or the tiny
    byte-level one for the default tiny model."""
    path = args.tokenizer_name_or_path or args.model_name_or_path
    if path is None:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    check_model_path(path, "--tokenizer-name-or-path" if args.tokenizer_name_or_path else "--model-name-or-path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except OSError as e:  # not a local folder and not on the hub (or offline)
        raise ArgumentError(f"{path}: no tokenizer found ({e})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.sep_token
    return tokenizer


def load_model(auto_class, path: str, args, tokenizer, flag: str = "--model-name-or-path", **kwargs):
    """A pretrained model with float32 master weights whatever dtype its checkpoint is stored in (transformers
    would otherwise load a bf16 checkpoint as bf16, and Adam's updates would then mostly round away); --bf16
    adds bf16 autocast for the forward passes instead. Says what was loaded and how it trains."""
    from transformers import AutoConfig

    check_model_path(path, flag)
    try:
        stored = getattr(AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code), "dtype", None)
        model = auto_class.from_pretrained(
            path,
            dtype=torch.float32,
            attn_implementation=args.attn_implementation,
            trust_remote_code=args.trust_remote_code,
            **kwargs,
        )
    except OSError as e:
        raise ArgumentError(f"{flag} {path}: no model found ({e})") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ArgumentError(
            f"{flag} {path}: the tokenizer has {len(tokenizer)} tokens (pad id {tokenizer.pad_token_id}) "
            f"but the model embeds only {rows}: it is not the model's own tokenizer (transformers may "
            f"have built one for the model type from other files); pass --tokenizer-name-or-path"
        )
    print(
        f"{path}: checkpoint stored in {stored or 'float32'}; float32 master weights"
        + (", bf16 autocast" if args.bf16 else "")
    )
    return model


# ----------------------------------------------------------------------------------------------
# Memory: gradient checkpointing, LoRA (the reference is the model with its adapter off), FSDP2
# ----------------------------------------------------------------------------------------------


def prepare_model(model, args, task_type: str):
    """--gradient-checkpointing (the model's own, non-reentrant: it works under DDP and with frozen embeddings),
    then --lora-r > 0: a peft LoRA adapter on --lora-target-modules (default: every linear layer but the output
    one); the adapter (and a classifier's head) are then the only trainable weights, in fp32, and with --bf16 the
    frozen weights are stored in bf16. task_type: peft's (CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION)."""
    if args.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ArgumentError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.x on
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # for plain forwards (generate asks for its cache itself)
    if not args.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    if args.bf16:  # frozen weights need no fp32 master copy: stored in bf16 they take half the memory
        model.to(torch.bfloat16)

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules) or "all-linear",
        task_type=task_type,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules that the model does not have
        raise ArgumentError(f"--lora-target-modules {' '.join(args.lora_target_modules)}: {e}") from None
    for p in model.parameters():  # what trains keeps fp32 master weights (the adapter, a classifier's head)
        if p.requires_grad:
            p.data = p.data.float()
    return model


class WithoutAdapter:
    """The reference policy under LoRA: the policy itself with its adapter switched off and in eval mode, so the
    frozen weights are shared instead of copied. Called like the model (no gradients flow: callers use no_grad)."""

    def __init__(self, model):
        self.model = model

    def parameters(self):
        return self.model.parameters()

    def __call__(self, **inputs):
        training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(**inputs)
        finally:
            self.model.train(training)


def reference_policy(model, args):
    """The frozen reference: with LoRA the model with its adapter off (`WithoutAdapter`), else a frozen copy."""
    if args.lora_r:
        return WithoutAdapter(model)
    return copy.deepcopy(model).eval().requires_grad_(False)


def disable_dropout(model):
    """Dropout off everywhere, so that train() (which switches gradient checkpointing on) computes the same
    function as eval(): nn.Dropout modules, LoRA's, and the float rates attention layers apply functionally."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def distribute(model, args, distributed: bool, frozen: bool = False):
    """The model as it computes under torchrun. With --fsdp, FSDP2 shards each transformer layer, then the rest,
    over the processes (weights, gradients and AdamW state: 1/world each; a layer's weights are gathered for its
    forward and backward), frozen models too; otherwise DDP replicates a trained model and leaves a frozen one
    alone. Both average gradients over processes, so the scripts' weighting by the world size holds for both."""
    if not distributed or (frozen and not args.fsdp):
        return model
    if not args.fsdp:
        return DDP(model)
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):  # transformers' decoder (and encoder) layers
            fully_shard(module)
    return fully_shard(model)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync(model, skip: bool):
    """DDP's no_sync for the micro-batches before the last one (FSDP2 reduces each backward's gradients itself)."""
    return model.no_sync() if skip and isinstance(model, DDP) else contextlib.nullcontext()


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the model's parameters; the total norm as a plain tensor (FSDP2's is a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_weights(model) -> Optional[dict]:
    """The state dict of a model sharded with --fsdp, gathered to rank 0 on the CPU (a collective: every process
    calls it; the others get {}); None for a model that is not sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def autocast(args, device: torch.device):
    """bf16 autocast of the forward passes with --bf16 (a no-op context without it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def check_outputs(values, what: str, where: str, must_vary: bool = True):
    """Stop, naming the likely causes, when a model's outputs over an evaluation are not finite (nothing non-finite
    is saved) or the same for every different input (the model reads nothing of the text: a 50% table hides it)."""
    if not all(map(math.isfinite, values)):
        raise FloatingPointError(
            f"{where}: a {what} is not finite; nothing was saved. Likely causes: a learning rate "
            f"too high, fp16/bf16 overflow; --skip-nonfinite-steps skips steps with non-finite gradients"
        )
    if must_vary and len(values) > 2 and len(set(values)) == 1:
        raise RuntimeError(
            f"{where}: every {what} is exactly {values[0]}, whatever the text; the model sees none of "
            f"it (a tokenizer that is not the model's own? a head that was not loaded or trained?)"
        )


# ----------------------------------------------------------------------------------------------
# Evaluation: the splits and the per-domain reports
# ----------------------------------------------------------------------------------------------


def eval_sources(dataset: str, eval_datasets) -> dict:
    """Evaluation splits by a unique name -> (source, split): each of --eval-datasets (an embedded dataset's name for
    its held-out splits, a hub name with an optional ":split", a local file or folder), or by default the embedded
    dataset's held-out splits when training on one. Two sources with the same short name keep their full one."""
    if not eval_datasets:
        eval_datasets = (dataset,) if dataset in EMBEDDED else ()
    sources, several = [], sum(name in EMBEDDED for name in eval_datasets) > 1
    for name in eval_datasets:
        if name in EMBEDDED:  # split names as they are, or prefixed by the dataset's when several are evaluated
            sources += [(f"{name}:{s}" if several else s, name, s) for s in EMBEDDED[name][0] if s != "train"]
        else:
            source, _, split = name.rpartition(":") if ":" in name and not _is_local(name) else (name, "", "")
            short = (
                os.path.splitext(os.path.basename(source.rstrip("/")))[0]
                if _is_local(source)
                else source.split("/")[-1]
            )
            sources.append((short + (f":{split}" if split else ""), source, split or None))
    shorts = [s for s, _, _ in sources]
    named = {}
    for short, source, split in sources:
        name = short if shorts.count(short) == 1 else source + (f":{split}" if split else "")
        if name in named:
            raise ArgumentError(f"--eval-datasets names {name!r} twice")
        named[name] = (source, split)
    return named


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
    """One line per split: each domain, the mean over domains and the worst domain (in %)."""
    domains = sorted({d for r in results.values() for d in r[f"domain_{name}"]})
    pct = 100 if name == "accuracy" else 1
    print(f"{'split':<16}" + "".join(f"{d:>11}" for d in domains) + f"{'mean':>9}{'worst':>9}")
    for split, r in results.items():
        per, digits = r[f"domain_{name}"], 1 if pct == 100 else 3
        cells = "".join(f"{pct * per[d]:>11.{digits}f}" if d in per else f"{'-':>11}" for d in domains)
        mean = sum(per.values()) / len(per)
        print(f"{split:<16}{cells}{pct * mean:>9.{digits}f}{pct * r[f'worst_domain_{name}']:>9.{digits}f}")


# ----------------------------------------------------------------------------------------------
# Runs: the output folder, tracking, checkpoints with exact resume, saving
# ----------------------------------------------------------------------------------------------
# A run's folder holds metrics.jsonl, TensorBoard events, checkpoints/step-<N>/ and, at the end, model/ and
# args.json. Every write that a kill could interrupt goes to a temporary name first and is then renamed onto a
# name that did not exist, so at every instant a complete model or checkpoint exists.

RUN_FILES = ("metrics.jsonl", "args.json", "model", "checkpoints")


def init_distributed():
    """(distributed, rank, world size, device): under torchrun a process group (nccl on GPUs, gloo on CPUs)."""
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    return distributed, rank, world, device


def find_checkpoint(args, output_dir: str) -> Optional[str]:
    """The checkpoint to resume from (--resume-from, or with --resume the latest complete one of the output folder),
    after refusing a folder that holds a previous run unless --resume or --overwrite says what to do with it. A
    resumed run keeps the run id of the run it continues (args.run_id)."""
    checkpoint = _find_checkpoint(args, output_dir)
    if checkpoint:  # checked before anything is touched: the sizes of its files and what wrote it
        meta = json.load(open(os.path.join(checkpoint, "COMPLETE")))
        for name, size in meta["files"].items():
            path = os.path.join(checkpoint, name)
            if not os.path.exists(path) or os.path.getsize(path) != size:
                raise ArgumentError(
                    f"checkpoint {checkpoint} cannot be read: {name} is truncated or missing; "
                    f"resume from another with --resume-from"
                )
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for key, mine in (("script", args.exp_name), ("world_size", world), ("model", args.model_name_or_path)):
            if meta[key] != mine:
                raise ArgumentError(
                    f"checkpoint {checkpoint} was written with {key} {meta[key]!r}, this run has {mine!r}"
                )
        args.run_id = meta["run_id"]
    return checkpoint


def _find_checkpoint(args, output_dir: str) -> Optional[str]:
    if args.resume_from:
        if not os.path.exists(os.path.join(args.resume_from, "COMPLETE")):
            raise ArgumentError(f"--resume-from {args.resume_from}: not a complete checkpoint (no COMPLETE marker)")
        return args.resume_from
    folder = os.path.join(output_dir, "checkpoints")
    if args.resume:
        done = (
            sorted(
                c
                for c in os.listdir(folder)
                if c.startswith("step-") and "." not in c and os.path.exists(os.path.join(folder, c, "COMPLETE"))
            )
            if os.path.isdir(folder)
            else []
        )
        if not done:
            raise ArgumentError(f"--resume: {output_dir} has no complete checkpoint to resume from")
        return os.path.join(folder, done[-1])
    previous = [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if previous and not args.overwrite:
        raise ArgumentError(
            f"{output_dir} holds a previous run ({', '.join(previous)}); pass --resume to continue it, "
            f"--overwrite to replace it, or another --output-dir"
        )
    return None


class Tracker:
    """Rank 0's side of a run: the locked output folder, metrics.jsonl (each line with the run's id), TensorBoard
    (wandb mirrors it with --track). On resume it keeps the lines and events up to the checkpoint's step."""

    def __init__(self, args, output_dir: str, checkpoint: Optional[str]):
        import fcntl
        import shutil

        os.makedirs(output_dir, exist_ok=True)
        self.lock = open(os.path.join(output_dir, ".lock"), "w")
        try:  # held until the process ends, however it ends
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArgumentError(f"{output_dir}: another run is writing to this folder right now") from None
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        resume_step = json.load(open(os.path.join(checkpoint, "COMPLETE")))["step"] if checkpoint else None
        if resume_step is None:  # a new run (after --overwrite, the previous one's files go)
            for name in RUN_FILES + tuple(f for f in os.listdir(output_dir) if f.startswith("events.out.tfevents")):
                path = os.path.join(output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path) if os.path.exists(path) else None
            write_atomically(self.metrics_path, "")
        else:  # the lines of the steps up to the checkpoint's; later ones are written again
            lines = [json.loads(line) for line in open(self.metrics_path)] if os.path.exists(self.metrics_path) else []
            kept = [line for line in lines if line["step"] <= resume_step]
            write_atomically(self.metrics_path, "".join(json.dumps(line) + "\n" for line in kept))
        if args.track:
            import wandb

            wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                sync_tensorboard=True,
                config=vars(args),
                name=args.run_id,
                id=args.run_id,
                resume="allow",
                save_code=True,
            )
        self.run_id = args.run_id
        self.writer = SummaryWriter(output_dir, purge_step=None if resume_step is None else resume_step + 1)
        self.writer.add_text(
            "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        )

    def scalars(self, scalars: dict, step: int):
        """TensorBoard scalars; NaN entries (e.g. a dual variable the set does not have) are left out."""
        for key, value in scalars.items():
            if not math.isnan(value):
                self.writer.add_scalar(key, value, step)

    def eval(self, step: int, split: str, report: dict):
        """Append one evaluation to metrics.jsonl and TensorBoard (eval/<split>/<metric>[/<domain>])."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **report, "run_id": self.run_id}) + "\n")
        for key, value in report.items():
            for sub, v in value.items() if isinstance(value, dict) else [("", value)]:
                self.writer.add_scalar(f"eval/{split}/{key}" + (f"/{sub}" if sub else ""), v, step)

    def close(self):
        self.writer.close()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, text: str):
    """Write a file under a temporary name, fsync it, then rename it onto `path`."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    output_dir: str, step: int, modules: dict, optimizer, scheduler, extra: dict, args, rank: int = 0, world: int = 1
):
    """Everything the next step depends on: the modules' weights, optimizer, scheduler, every process's RNG
    states, the step and `extra` (anything else the script needs). Written into a temporary folder, fsynced, then
    renamed to checkpoints/step-<N>; only then are checkpoints beyond --keep-checkpoints removed."""
    import shutil

    check_finite(modules, step)
    sharded = any(is_sharded(m) for m in modules.values())
    if sharded:  # --fsdp: the whole weights and optimizer state, gathered to rank 0 (every process takes part)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, optimizer_state = get_state_dict(torch.nn.ModuleDict(modules), optimizer, options=options)
    folder = os.path.join(output_dir, "checkpoints", f"step-{step:08d}")
    tmp = folder + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    _fsync(os.path.join(tmp, f"rng-{rank}.pt"))
    _barrier()
    if rank == 0:
        state = {
            "step": step,
            "script": args.exp_name,
            "world_size": world,
            "model": args.model_name_or_path,
            "fsdp": sharded,
            "modules": weights if sharded else {name: m.state_dict() for name, m in modules.items()},
            "optimizer": optimizer_state if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra,
        }
        torch.save(state, os.path.join(tmp, "state.pt"))
        _fsync(os.path.join(tmp, "state.pt"))
        meta = {
            "step": step,
            "run_id": args.run_id,
            "script": args.exp_name,
            "world_size": world,
            "model": args.model_name_or_path,
            "files": {f: os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)},
        }
        write_atomically(os.path.join(tmp, "COMPLETE"), json.dumps(meta) + "\n")
        _fsync(tmp)
        if os.path.exists(folder):  # only when resuming from an older checkpoint than the latest
            os.replace(folder, folder + ".old")
            shutil.rmtree(folder + ".old")
        os.replace(tmp, folder)
        _fsync(os.path.dirname(folder))
        done = sorted(c for c in os.listdir(os.path.dirname(folder)) if c.startswith("step-") and "." not in c)
        for old in done[: -args.keep_checkpoints]:
            shutil.rmtree(os.path.join(os.path.dirname(folder), old))
    _barrier()


def load_checkpoint(path: str, modules: dict, optimizer, scheduler, args, rank: int = 0, world: int = 1) -> dict:
    """Restore what save_checkpoint wrote (this process's RNG states included); returns the step and `extra`.
    A truncated, corrupt or incompatible checkpoint (another script, model or world size) is a clear error."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
        rng = torch.load(os.path.join(path, f"rng-{rank}.pt"), weights_only=False)
    except Exception as e:
        raise ArgumentError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}): "
            f"truncated or corrupt; resume from another with --resume-from"
        ) from None
    for key, mine in (("script", args.exp_name), ("world_size", world), ("model", args.model_name_or_path)):
        if state[key] != mine:
            raise ArgumentError(f"checkpoint {path} was written with {key} {state[key]!r}, this run has {mine!r}")
    sharded = any(is_sharded(m) for m in modules.values())
    if state.get("fsdp", False) != sharded:
        raise ArgumentError(f"checkpoint {path} was written {'with' if sharded else 'without'} --fsdp, unlike this run")
    try:
        if sharded:  # every process reads the whole state and keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                torch.nn.ModuleDict(modules),
                optimizer,
                model_state_dict=state["modules"],
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        for name, module in modules.items() if not sharded else ():
            module.load_state_dict(state["modules"][name])
        if not sharded:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ArgumentError(f"checkpoint {path} does not fit this model ({str(e)[:300]})") from None
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rng)
    return state


class StopSignal:
    """SIGTERM/SIGINT (preemption, Ctrl-C) set a flag instead of killing the process: the run finishes its step,
    saves a checkpoint and exits. Under torchrun the ranks agree on the flag, so they all stop at the same step."""

    def __init__(self):
        import signal

        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self) -> bool:
        flag = torch.tensor([self.signum], dtype=torch.long)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum != 0

    def exit(self, output_dir: str, step: int):
        import signal
        import sys

        print(
            f"stopped by {signal.Signals(self.signum).name} after step {step}; checkpoint saved in {output_dir}/"
            f"checkpoints (continue with --resume)",
            file=sys.stderr,
        )
        sys.exit(128 + self.signum)


def check_finite(modules: dict, step: int):
    """Nothing non-finite is ever saved: stop with the step and the likely causes instead (on every process, also
    when each holds only its shard of the weights)."""
    for name, module in modules.items():
        bad = [
            n
            for n, p in module.state_dict().items()
            if p.is_floating_point() and not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
        ]
        if is_sharded(module):  # another process's shard may be the bad one
            flag = torch.tensor([len(bad)], device=device_of(module))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bad or (["(in another process's shard)"] if flag.item() else [])
        if bad:
            raise FloatingPointError(
                f"step {step}: the {name}'s weights are not finite ({', '.join(bad[:3])}...); nothing "
                f"was saved. Likely causes: a learning rate too high, --max-grad-norm too high, fp16/bf16 "
                f"overflow; --skip-nonfinite-steps skips steps whose loss or gradient is not finite"
            )


def nonfinite_gradients(model) -> bool:
    return any(p.grad is not None and not torch.isfinite(p.grad).all() for p in model.parameters())


def save_atomically(model, tokenizer, path: str, state_dict: Optional[dict] = None):
    """save_pretrained into a temporary folder and fsync it, then rename the old `path` away and the new one onto
    `path`, then remove the old one: at every instant a complete model exists (`path`, or `path`.old between the
    two renames, which the next save or a resumed run puts back)."""
    import shutil

    tmp, old = path + ".tmp", path + ".old"
    if os.path.exists(old) and not os.path.exists(path):  # a save killed between its two renames
        os.replace(old, path)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        _fsync(os.path.join(tmp, name))
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def save_run(output_dir: str, args, model, tokenizer, step: int, base_changed: bool = False):
    """The trained model and tokenizer in <output_dir>/model (unless --no-save-model), after checking that its
    weights are finite, and args.json; every process calls it, rank 0 writes. With LoRA: the adapter alone, which
    peft applies to --model-name-or-path; the merged weights (they load with the Auto classes) with --merge-lora,
    or when the base exists nowhere else (the tiny model, or `base_changed` by a warm start)."""
    check_finite({"model": model}, step)
    weights = full_weights(model) if args.save_model else None  # --fsdp: gathered by every process
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    if args.save_model and args.lora_r and (args.merge_lora or base_changed or not args.model_name_or_path):
        model = model.merge_and_unload()
        print("saving the weights with the LoRA adapter merged")
    if args.save_model:
        save_atomically(model, tokenizer, os.path.join(output_dir, "model"), weights)
    write_atomically(os.path.join(output_dir, "args.json"), json.dumps(vars(args), default=str, indent=1))
