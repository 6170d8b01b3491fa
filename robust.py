"""The worst-case prompt weights of the robust minibatch loss: the paper's maths, which every script calls.

A minibatch holds N pairs (or rollouts) over B distinct prompts with per-prompt losses l_i. The robust loss is

    L(theta) = max_{q in Q_rho} sum_i q_i * l_i(theta),   Q_rho = {q in simplex_B : D(q || p0) <= rho},

with p0_i = n_i / N the batch's empirical prompt distribution (uniform when every prompt is distinct), and
by Danskin's theorem its gradient is sum_i q*_i grad l_i, with q* the maximiser computed from the detached
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
    """ambiguity set around the batch's empirical prompt distribution p0_i = n_i / N (group: over the known domains)"""
    rho: float = 0.5
    """radius around the batch's empirical prompt distribution p0 (n_i of the N pairs are prompt i's): tv: (1/2) sum
    |q_i - p0_i| in [0, 1]; chi2: (1/2) sum p0_i (q_i/p0_i - 1)^2; kl: KL(q||p0); cvar: q_i <= (1+rho) p0_i"""
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
        """q_g <- q_g exp(step * loss_g), normalised; a domain absent from the batch has loss 0 (Sagawa's code).
        Computed in log space relative to the largest loss (of a domain with weight), log q_g + step (loss_g - max),
        normalised by logsumexp: finite for every finite step and losses (exp(step * loss) alone overflows to inf / inf
        = NaN from step * loss > 709). Losses that are not finite leave the weights as they are (their step is
        stopped or skipped, see `robust_prompt_weights`)."""
        losses = group_losses.to(self.weights)
        if step == 0 or not bool(torch.isfinite(losses).all()):
            return
        alive = self.weights > 0  # a weight that underflowed to 0 stays 0, as in the product
        z = self.weights.log() + step * (losses - losses[alive].max())  # <= log q_g where alive: no overflow
        z = z.masked_fill(~alive, -math.inf)  # (-inf + inf = NaN when a dead domain's loss is above the others')
        self.weights = torch.exp(z - torch.logsumexp(z, 0))


def robust_weights(losses: torch.Tensor, kind: str, rho: float, return_dual: bool = False, p0=None):
    """Worst-case weights q* = argmax_{q in Q_rho} sum_i q_i * losses_i over the B entries of `losses`.

    Q_rho is the ball of radius rho around the centre `p0` (a 1-D tensor of B positive probabilities summing to 1 up
    to the rounding of its dtype; None: uniform, 1/B). When the centre itself is the maximiser (erm, rho = 0, B = 1,
    all losses equal) it is returned exactly as given, so that q* / p0 is exactly 1 there. Exact maximisers (kl: to
    1e-10 in the divergence), computed in float64 without gradient in O(B) passes, no Python loop over B; finite for
    any finite losses, up to spreads of the whole float64 range. Equal losses get equal q_i / p0_i. With
    `return_dual`, also returns the dual variable (tv: the rho-quantile eta of the losses under p0; chi2: the
    threshold eta; kl: the temperature tau; else nan).
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
    centre = _centre(p0, x)
    top, scale = x.max(), 1.0
    x = x - top  # equivariance to shifts; every loss is now <= 0 and the maxima are exactly 0
    if not math.isfinite(x.min().item()):  # a spread beyond the float64 range: halve (q* is scale-invariant)
        x, top, scale = losses.detach().to(torch.float64) / 2 - top / 2, top / 2, 2.0
    if kind == "erm" or rho == 0 or x.numel() == 1 or bool((x == 0).all()):
        return (centre, math.nan) if return_dual else centre
    q, dual = {"tv": _tv, "cvar": _cvar, "chi2": _chi2, "kl": _kl}[kind](x, centre / centre.sum(), rho)
    dual = scale * (dual + top.item()) if kind in ("tv", "chi2") else scale * dual  # back to the losses' units
    q = q / q.sum()
    return (q, dual) if return_dual else q


def _centre(p0, x):
    # p0 as float64 (uniform when None), checked to be a probability vector.
    if p0 is None:
        return torch.full_like(x, 1.0 / x.numel())
    if not isinstance(p0, torch.Tensor) or p0.shape != x.shape:
        raise ValueError(f"p0 must be a 1-D tensor of {x.numel()} probabilities, got {getattr(p0, 'shape', type(p0))}")
    centre = p0.detach().to(x)
    # Each entry rounded to p0's dtype errs by at most eps/2 of itself, so the sum by at most eps/2 in all; B * eps
    # also admits p0 computed with a few more roundings per entry (n_i / N in float32, a softmax).
    eps = torch.finfo(p0.dtype if p0.is_floating_point() else torch.float64).eps
    if not (bool((centre > 0).all()) and abs(centre.sum().item() - 1) <= x.numel() * eps):  # (NaN fails > 0)
        raise ValueError("p0 must hold positive probabilities summing to 1 (drop the entries of probability 0)")
    return centre


def _tv(x, p, rho):
    """Move mass m = rho from the smallest losses to the largest: q_i = 0 below eta, p_i between eta and the maximum,
    the maxima gain m in proportion to p_i, and the losses at eta keep the fraction (P(x <= eta) - m) / P(x = eta) of
    theirs, eta being the rho-quantile of the losses under p. (Once rho >= 1 - P(maxima), all the rest moves.)"""
    at_max = x == 0
    p_max = p[at_max].sum().item()
    m = min(rho, 1.0 - p_max)
    eta = _quantile(x, p, m)
    below, at = x < eta, x == eta
    kept = 1.0 - (m - p[below].sum().item()) / p[at].sum().item()
    r = torch.ones_like(x).masked_fill_(at, min(max(kept, 0.0), 1.0)).masked_fill_(below, 0.0)
    return p * r.masked_fill_(at_max, 1.0 + m / p_max), eta  # q_i = p_i r_i


def _cvar(x, p, rho):
    """Fill the caps (1 + rho) p_i from the largest loss down until the mass is 1: q_i = (1 + rho) p_i above the
    threshold b, 0 below it, and the losses at b share the rest, 1 - (1 + rho) P(x > b), in proportion to p_i. b is
    where the caps reach 1, (1 + rho) P(x > b) < 1 <= (1 + rho) P(x >= b): the rho / (1 + rho)-quantile under p."""
    b = _quantile(x, p, rho / (1.0 + rho))
    above, at = x > b, x == b
    share = (1.0 - (1.0 + rho) * p[above].sum().item()) / p[at].sum().item()
    r = torch.zeros_like(x).masked_fill_(at, min(max(share, 0.0), 1.0 + rho)).masked_fill_(above, 1.0 + rho)
    return p * r, math.nan


def _quantile(x, p, m):
    """The m-quantile of the losses under p: the smallest loss v with P(x <= v) > m (the largest, should rounding
    leave none), found by sorting. While many losses remain, two pivots read off a sorted sample bracket v first: one
    pass keeps only the losses between them (or, should v lie outside, beyond them) and the exact mass below."""
    below = 0.0  # the mass of the losses ruled out as smaller than v
    while x.numel() > 16384:
        n = x.numel()
        sample, order = torch.sort(x[:: n // 4096])
        cum = p[:: n // 4096][order].cumsum(0)
        i = int(torch.searchsorted(cum, (m - below) / p.sum() * cum[-1]))  # v's rank in the sample, give or take 32
        lo, hi = sample[max(i - 128, 0)], sample[min(i + 128, len(sample) - 1)]
        mass_lo = below + torch.where(x < lo, p, 0.0).sum().item()
        inside = (x >= lo) & (x <= hi)
        mass_hi = mass_lo + torch.where(inside, p, 0.0).sum().item()
        keep, kept_below = (x < lo, below) if mass_lo > m else (inside, mass_lo) if mass_hi > m else (x > hi, mass_hi)
        if 2 * keep.sum() > n:  # no progress (an unlucky sample, many ties): sort what is left
            break
        x, p, below = x[keep], p[keep], kept_below
    s, order = torch.sort(x)
    cum = below + p[order].cumsum(0)
    return s[torch.searchsorted(cum, m, right=True).clamp(max=len(s) - 1)].item()


def _chi2(x, p, rho, iters=100):
    """q_i proportional to p_i (x_i - eta)_+, eta such that (1/2) sum p_i (q_i / p_i - 1)^2 = rho, i.e. sum q_i^2 / p_i
    = c = 1 + 2 rho (Levy et al. 2020). On an active set {x > eta} of mass P, p-mean mu and p-spread V = sum p_i (x_i -
    mu)^2 over it, the constraint (V + P d^2) / (P d)^2 = c with d = mu - eta gives d = sqrt(V / (P (c P - 1))).
    Starting from all losses, the active set shrinks to the support of q* (as in Michelot's projection onto the
    simplex) in a handful of O(B) passes; where rounding defeats this (losses spread over many orders of magnitude),
    a bisection on eta takes over."""
    c, at_max = 1.0 + 2.0 * rho, x == 0
    if c * p[at_max].sum().item() >= 1.0:  # the point mass on the maxima (sum q^2 / p = 1 / P(maxima)) is inside
        return p * at_max, 0.0
    active = torch.ones_like(x, dtype=torch.bool)
    for _ in range(iters):
        w = p * active
        mass = w.sum()
        mean = (w * x).sum() / mass
        denom = mass * (c * mass - 1.0)  # > 0 on the support in exact arithmetic: c P(support) > 1 (Cauchy-Schwarz)
        if denom <= 0:
            return _chi2_bisection(x, p, c)
        eta = mean - torch.sqrt((w * (x - mean) ** 2).sum() / denom)
        if torch.equal(x > eta, active):
            break
        active = x > eta
    r = (x - eta).clamp(min=0.0)  # q_i / p_i, up to the normalisation
    q = p * r
    if abs(((q * r).sum() / q.sum() ** 2).item() - c) <= 1e-6 * c:  # (False for a NaN eta or an empty q)
        return q, eta.item()
    return _chi2_bisection(x, p, c)


def _chi2_bisection(x, p, c, iters=200):
    # sum p r^2 / (sum p r)^2 with r = (x - eta)_+ grows from 1 (eta -> -inf) to 1 / P(maxima) > c (eta -> 0): bisect
    # for = c on losses scaled to [-1, 0], keeping the feasible side. It is tested as 1 / P + V / (P m)^2 <= c (P, m
    # and V: the mass, p-mean and p-spread of r where r > 0), which keeps V > 0 where a one-pass sum rounds it away:
    # on a support of mass exactly 1 / c, the next loss down must still get its tiny weight.
    y = x / -x.min()

    def feasible(eta):
        r = (y - eta).clamp(min=0.0)
        w = p * (r > 0)
        mass = w.sum()
        mean = (w * r).sum() / mass
        return bool((w * (r - mean) ** 2).sum() <= (c - 1.0 / mass) * (mass * mean) ** 2)

    lo, hi = -1.0, 0.0
    while not feasible(lo):
        lo = 2.0 * lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return p * (y - lo).clamp(min=0.0), lo * -x.min().item()


def _kl(x, p, rho, iters=1100):
    """q_i proportional to p_i exp(x_i / tau), tau such that KL(q || p) = rho. On losses scaled to y in [-1, 0] and
    with beta = scale / tau, KL(beta) = beta E_q[y] - log sum_i p_i exp(beta y_i) grows with beta (its slope is
    beta Var_q(y)) from 0 to -log P(maxima): Newton steps for KL(beta) = rho, safeguarded by bisection."""
    if -math.log(p[x == 0].sum().item()) <= rho:  # the point mass on the maxima is inside the set
        return p * (x == 0), 0.0
    scale = -x.min()
    y = x / scale
    beta = math.sqrt(2.0 * rho / (p * (y - (p * y).sum()) ** 2).sum().item())  # KL ~ beta^2 Var_p(y) / 2 for small beta
    lo, hi, log_p = 0.0, math.inf, torch.log(p)
    for _ in range(iters):
        e = torch.exp(torch.add(log_p, y, alpha=beta))  # p_i exp(beta y_i) <= 1, and the sum is >= P(maxima) > 0
        total = e.sum()
        mean = torch.dot(e, y) / total
        kl = (beta * mean - torch.log(total)).item()
        if abs(kl - rho) <= 1e-10 * max(1.0, rho):
            break
        lo, hi = (beta, hi) if kl < rho else (lo, beta)
        d = y - mean
        slope = beta * (torch.dot(e * d, d) / total).item()
        step = beta - (kl - rho) / slope if slope > 0 else math.nan
        beta = step if lo < step < hi else (0.5 * (lo + hi) if hi < math.inf else 2.0 * beta)
    if kl - rho > 1e-10 * max(1.0, rho):  # not converged (near-ties at a tiny fraction of the spread): feasible side
        beta = lo
    return torch.softmax(torch.add(log_p, y, alpha=beta), 0), scale.item() / beta if beta > 0 else math.inf


def robust_prompt_weights(losses: torch.Tensor, prompt_ids: torch.Tensor, dro: DROArgs, groups=None, domains=None):
    """The worst case over the prompts of the *global* batch, as a weight for each of this process's losses.

    `losses` are this process's detached losses (one per pair or rollout), `prompt_ids` the prompt of each. Under
    torch.distributed the losses of all ranks are gathered first, so the worst case is over the whole batch. A
    prompt's loss l_i is the mean of its n_i losses (of the N in the global batch), and q* is computed over the B
    prompts in the ball around the batch's empirical prompt distribution p0_i = n_i / N; each loss of prompt i gets
    q*_i / n_i, so the weights of all ranks sum to 1 and rho = 0 (or --dro.kind erm) gives exactly 1/N each: the
    plain mean over pairs, as TRL's trainers compute it. Returns (weights, dict of diagnostics). A batch with a NaN
    or infinite loss has no worst case: every weight is NaN (so is the step's loss: the run stops or skips the step).
    With --dro.kind group, `groups` (GroupWeights) is updated with each domain's loss, the mean over its losses
    (`domains`: the domain of each loss), and each loss gets its domain's weight / the domain's number of losses.
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
    if not bool(torch.isfinite(all_losses).all()):  # no worst case: NaN weights make the step's loss NaN, which
        return torch.full_like(losses, math.nan), {"dro/erm_loss": all_losses.double().mean().item()}  # stops it
    N = all_ids.numel()
    _, inverse, counts = torch.unique(all_ids, return_inverse=True, return_counts=True)
    prompt_losses = torch.zeros(len(counts), dtype=torch.float64, device=losses.device)
    prompt_losses.index_add_(0, inverse, all_losses.double())
    prompt_losses /= counts
    p0 = counts.double() / N  # the centre of the ball: the batch's empirical prompt distribution
    stats = {}
    if groups is None:
        q, dual = robust_weights(prompt_losses, dro.kind, dro.rho, return_dual=True, p0=p0)
        # q_i / n_i. Where q* is the centre (rho = 0, erm), robust_weights returns p0 itself and this is the rounded
        # n_i / N over n_i, within 2^-52 of 1/N relatively; 1/N (not a power of 2) lies at least 2^-25 / N relatively
        # from where float32 rounds up or down, so for N < 2^26 every loss gets exactly float32(1/N): the plain mean
        weights = (q / counts)[inverse]
    else:  # the EG update on the per-domain mean losses, then each loss's share of its domain's weight
        n = torch.bincount(all_domains, minlength=len(groups.names)).double()
        group_losses = torch.zeros(len(groups.names), dtype=torch.float64, device=losses.device)
        group_losses.index_add_(0, all_domains, all_losses.double())
        group_losses /= n.clamp(min=1)
        groups.update(group_losses.cpu(), dro.group_step)
        weights, dual = (groups.weights.to(losses.device) / n.clamp(min=1))[all_domains], float("nan")
        q = torch.zeros_like(prompt_losses).index_add_(0, inverse, weights)  # each prompt's total, for the stats
        for name, w, gl, present in zip(groups.names, groups.weights.tolist(), group_losses.tolist(), n.tolist()):
            stats[f"dro/group_weight/{name}"] = w
            stats[f"dro/group_loss/{name}"] = gl if present else float("nan")
    # Weight concentration relative to the centre, i.e. over the N losses: the largest q_i / p0_i (N times the
    # largest weight of a loss: 1 at q = p0, B times the largest q_i when every prompt is distinct) and the effective
    # sample size fraction (sum q)^2 / sum q_i^2 / p0_i (that of the N loss weights divided by N; 1 / (1 + 2 chi2)).
    # (Group DRO may put all the weight on domains absent from the batch, e.g. with a huge --dro.group-step: q = 0.)
    square = (q.square() / p0).sum().item()
    stats.update(
        {
            "dro/robust_loss": (q * prompt_losses).sum().item(),
            "dro/erm_loss": all_losses.double().mean().item(),  # = sum p0_i l_i, the plain mean over pairs
            "dro/max_weight_x_B": (q / p0).max().item(),
            "dro/ess_fraction": q.sum().item() ** 2 / square if square > 0 else math.nan,
            "dro/dual": dual,
        }
    )
    return weights[offset : offset + losses.numel()].to(losses.dtype), stats
