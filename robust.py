"""The worst-case prompt weights of the robust minibatch loss: the paper's maths, which every script calls.

A minibatch holds N pairs (or rollouts) over B distinct prompts with per-prompt losses l_i. The robust loss is

    L(theta) = max_{q in Q_rho} sum_i q_i * l_i(theta),   Q_rho = {q in simplex_B : D(q || uniform) <= rho},

and by Danskin's theorem its gradient is sum_i q*_i grad l_i, with q* the maximiser computed from the detached
losses. `robust_weights` computes q* exactly for each ambiguity set (the closed forms of the design's table);
`robust_prompt_weights` groups a batch's losses by prompt, gathers them over processes, and returns each loss's
share of q*. Read this file with the scripts: it is the method. Nothing in it depends on the rest of the project.
"""

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

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
            from common import ArgumentError  # (a user error: printed without a traceback)

            raise ArgumentError(
                f"--dro.kind group needs a `domain` column with at least two domains; the training "
                f"data has {names} (rows without one are domain 'all')"
            )
        return cls(names, torch.full((len(names),), 1.0 / len(names), dtype=torch.float64))

    def update(self, group_losses: torch.Tensor, step: float):
        """q_g <- q_g exp(step * loss_g), normalised; a domain absent from the batch has loss 0 (Sagawa's code)."""
        self.weights = self.weights * torch.exp(step * group_losses)
        self.weights = self.weights / self.weights.sum()


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
