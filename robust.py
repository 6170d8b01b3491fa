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
        """q_g <- q_g exp(step * loss_g), normalised; a domain absent from the batch has loss 0 (Sagawa's code)."""
        self.weights = self.weights * torch.exp(step * group_losses)
        self.weights = self.weights / self.weights.sum()


def robust_weights(losses: torch.Tensor, kind: str, rho: float, return_dual: bool = False, p0=None):
    """Worst-case weights q* = argmax_{q in Q_rho} sum_i q_i * losses_i over the B entries of `losses`.

    Q_rho is the ball of radius rho around the centre `p0` (a 1-D tensor of B positive probabilities summing to 1 up
    to the rounding of its dtype; None: uniform, 1/B). When the centre itself is the maximiser (erm, rho = 0, B = 1,
    all losses equal) it is returned exactly as given, so that q* / p0 is exactly 1 there. Exact maximisers (kl: to
    1e-10 in the divergence), computed in float64 without gradient in a few O(B) passes (selection, never a sort of
    all B losses), no Python loop over B; finite for any finite losses, up to spreads of the whole float64 range.
    The same holds around any centre; a uniform one runs the uniform code, bit for bit the same. Entries with equal
    losses always get equal weights relative to their p0 (equal q_i / p0_i). With `return_dual`, also returns the
    dual variable (tv: the rho-quantile eta of the losses under p0; chi2: the threshold eta; kl: the temperature tau;
    else nan).
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
    centre, p = _centre(p0, B, x.device)
    top, scale = x.max(), 1.0
    x = x - top  # equivariance to shifts, and no overflow anywhere below
    if not math.isfinite(x.min().item()):  # a spread beyond the float64 range: halve (q* is scale-invariant)
        x, top, scale = (losses.detach().to(torch.float64) / 2 - top / 2), top / 2, 2.0
    at_max = x == 0
    dual = float("nan")
    if kind == "erm" or rho == 0 or B == 1 or bool(at_max.all()):
        if centre is not None:  # q* = p0, bit for bit
            return (centre, dual) if return_dual else centre
        q = torch.full_like(x, 1.0 / B)
    elif kind == "tv":  # p is None for a uniform centre: the original code, rank selection and all
        q, eta = _tv(x, at_max, rho) if p is None else _tv_p0(x, at_max, p, rho)
        dual = scale * (eta + top.item())
    elif kind == "cvar":
        q = _cvar(x, rho) if p is None else _cvar_p0(x, p, rho)
    elif kind == "chi2":
        q, eta = _chi2(x, at_max, rho) if p is None else _chi2_p0(x, at_max, p, rho)
        dual = scale * (eta + top.item())
    else:
        q, tau = _kl(x, at_max, rho) if p is None else _kl_p0(x, at_max, p, rho)
        dual = scale * tau
    q = q / q.sum()
    return (q, dual) if return_dual else q


def _centre(p0, B, device):
    # Returns (p0 as float64, exactly as given; p0 normalised, or None when uniform). A uniform centre takes the
    # original uniform code below, so every result with p0 = None or uniform is bit for bit what it always was.
    if p0 is None:
        return None, None
    if not isinstance(p0, torch.Tensor) or p0.shape != (B,):
        raise ValueError(f"p0 must be a 1-D tensor of {B} probabilities, got {getattr(p0, 'shape', type(p0))}")
    centre = p0.detach().to(device=device, dtype=torch.float64)
    # Each entry rounded to p0's dtype errs by at most eps/2 of itself, so the sum by at most eps/2 in all; B * eps
    # also admits p0 computed with a few more roundings per entry (n_i / N in float32, a softmax).
    eps = torch.finfo(p0.dtype if p0.is_floating_point() else torch.float64).eps
    if not (
        bool(torch.isfinite(centre).all()) and bool((centre > 0).all()) and abs(centre.sum().item() - 1) <= B * eps
    ):
        raise ValueError("p0 must hold positive probabilities summing to 1 (drop the entries of probability 0)")
    if bool((centre == centre[0]).all()):
        return centre, None
    return centre, centre / centre.sum()


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


def _chi2_bisection(x, c, p=None, iters=200):
    # f(eta) = sum p (x - eta)_+^2 / (sum p (x - eta)_+)^2 (p = 1/B: B sum (x - eta)_+^2 / (sum (x - eta)_+)^2) grows
    # from 1 (eta -> -inf) to 1 / p(maxima) > c (eta -> 0): bisect for f(eta) = c on losses scaled to [-1, 0],
    # keeping the side where the constraint holds.
    B, scale = x.numel(), -x.min()
    y = x / scale

    def f(eta):
        r = (y - eta).clamp(min=0.0)
        if p is None:
            return B * (r / r.sum()).square().sum().item()
        return ((p * r * r).sum() / (p * r).sum() ** 2).item()

    lo, hi = -1.0, 0.0
    while f(lo) > c:  # f -> 1 as eta -> -inf
        lo = 2.0 * lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) <= c else (lo, mid)
    r = (y - lo).clamp(min=0.0)
    return (r if p is None else p * r), lo * scale.item()


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

    beta = math.sqrt(2.0 * rho / y.var(unbiased=False).item())  # KL ~ beta^2 Var(y) / 2 for small beta
    beta = _kl_beta(kl_and_slope, rho, beta, iters)
    q = torch.softmax(beta * y, 0)
    return q, scale.item() / beta if beta > 0 else math.inf


def _kl_beta(kl_and_slope, rho, beta, iters):
    # The beta >= 0 with KL(beta) = rho from a first guess: Newton steps safeguarded by bisection.
    lo, hi = 0.0, math.inf
    for _ in range(iters):
        kl, slope = kl_and_slope(beta)
        if abs(kl - rho) <= 1e-10 * max(1.0, rho):
            break
        lo, hi = (beta, hi) if kl < rho else (lo, beta)
        step = beta - (kl - rho) / slope if slope > 0 else math.nan
        beta = step if lo < step < hi else (0.5 * (lo + hi) if hi < math.inf else 2.0 * beta)
    if kl - rho > 1e-10 * max(1.0, rho):  # not converged (near-ties at a tiny fraction of the spread): feasible side
        beta = lo
    return beta


def _weighted_quantile(x, p, m, sample=4096):
    # The smallest loss v with p(losses <= v) > m, without sorting the B losses (Floyd and Rivest's selection): two
    # pivots read off a strided sample of the candidates bracket v with a margin, and one pass keeps only the
    # candidates between them (a tenth when p is near uniform). Should that not halve them (a very skewed p), the
    # next pivot is their median (kthvalue), which does: O(B) in all. The last few candidates are sorted. Masses
    # are summed afresh from the candidates; should rounding leave no candidate above m, v is the largest.
    below, from_sample = 0.0, True  # below: the mass of the losses ruled out as smaller than v
    while x.numel() > 4 * sample:
        n = x.numel()
        if from_sample:
            s, order = torch.sort(x[:: n // sample])
            cum = p[:: n // sample][order].cumsum(0)
            f = (m - below) / p.sum().item() * cum[-1]  # the target, in the sample's mass
            bracket = torch.stack([f - 3.0 * cum[-1] / math.sqrt(len(s)), f + 3.0 * cum[-1] / math.sqrt(len(s))])
            lo, hi = s[torch.searchsorted(cum, bracket).clamp(max=len(s) - 1)].tolist()
        else:
            lo = hi = torch.kthvalue(x, (n + 1) // 2).values.item()
        mass_lo = below + torch.where(x < lo, p, 0.0).sum().item()
        inside = (x >= lo) & (x <= hi)
        mass_hi = mass_lo + torch.where(inside, p, 0.0).sum().item()
        if mass_lo > m:  # > below, so some candidate lies below lo
            keep = x < lo
        elif mass_hi > m:
            if lo == hi:
                return lo
            keep, below = inside, mass_lo
        else:
            keep, below = x > hi, mass_hi
            if not bool(keep.any()):
                return hi
        x, p = x[keep], p[keep]
        from_sample = x.numel() <= n // 2
    s, order = torch.sort(x)
    cum = below + p[order].cumsum(0)
    return s[torch.searchsorted(cum, m, right=True).clamp(max=len(s) - 1)].item()


def _tv_p0(x, at_max, p, rho):
    # _tv around a centre p: take mass rho from the smallest losses, each down to 0, the last one (the weighted
    # rho-quantile eta, with its ties) only partly, each tie keeping the same fraction of its p_i; the maxima gain
    # it in proportion to their p_i. Once rho >= 1 - p(maxima), every other loss is emptied.
    m = min(rho, 1.0)
    p_max = p[at_max].sum().item()
    if m >= 1.0 - p_max:
        return p * at_max, 0.0
    eta = _weighted_quantile(x, p, m)
    below, at = x < eta, x == eta
    kept = 1.0 - (m - p[below].sum().item()) / p[at].sum().item()  # the fraction of its mass each tie at eta keeps
    q = p.clone()
    q[below] = 0.0
    q[at] = p[at] * min(max(kept, 0.0), 1.0)
    q[at_max] += p[at_max] * ((1.0 - q.sum()) / p_max)
    return q, eta


def _cvar_p0(x, p, rho):
    # _cvar around a centre p: the caps are (1 + rho) p_i. The losses above the threshold b fill theirs and those at
    # b share the rest in proportion to p_i, b being where the caps filled from the top reach 1: (1 + rho) p(x > b) < 1
    # <= (1 + rho) p(x >= b), i.e. the smallest loss with p(losses <= b) > rho / (1 + rho), a weighted quantile.
    cap = ((1.0 + rho) * p).clamp(max=1.0)
    b = _weighted_quantile(x, p, rho / (1.0 + rho))
    above, at = x > b, x == b
    q = torch.where(above, cap, 0.0)
    q[at] = p[at] * (max(1.0 - cap[above].sum().item(), 0.0) / p[at].sum().item())
    return torch.minimum(q, cap)


def _chi2_p0(x, at_max, p, rho, iters=100):
    # _chi2 around a centre p: q_i proportional to p_i (x_i - eta)_+ with sum q_i^2 / p_i = c = 1 + 2 rho. On an
    # active set of mass P, p-mean m and p-spread V = sum p_i (x_i - m)^2 the constraint reads (V + P d^2) / (P d)^2 = c
    # with d = m - eta, so d = sqrt(V / (P (c P - 1))); the active set shrinks to the support as in _chi2. (P > 1 / c
    # on the support: sum q^2 / p >= 1 / p(support) by Cauchy-Schwarz, with equality only on tied maxima.)
    c = 1.0 + 2.0 * rho
    if 1.0 / p[at_max].sum().item() <= c:  # the point mass on the maxima (sum q^2 / p = 1 / p(maxima)) is inside
        return p * at_max, 0.0
    active = torch.ones_like(x, dtype=torch.bool)
    for _ in range(iters):
        w = p * active
        mass = w.sum()
        mean = (w * x).sum() / mass
        denom = mass * (c * mass - 1.0)
        if denom <= 0:
            return _chi2_bisection(x, c, p)
        eta = mean - torch.sqrt((w * (x - mean) ** 2).sum() / denom)
        new_active = x > eta
        if torch.equal(new_active, active):
            break
        active = new_active
    r = (x - eta).clamp(min=0.0)  # q_i / p_i, up to the normalisation
    q = p * r
    if not (
        math.isfinite(eta.item())
        and 0 < q.sum().item() < math.inf
        and abs((q * r).sum().item() / q.sum().item() ** 2 - c) <= 1e-6 * c
    ):
        return _chi2_bisection(x, c, p)
    return q, eta.item()


def _kl_p0(x, at_max, p, rho, iters=1100):
    # _kl around a centre p: q_i proportional to p_i exp(x_i / tau); KL(q || p) = beta E_q[y] - log sum p exp(beta y).
    if -math.log(p[at_max].sum().item()) <= rho:  # the point mass on the maxima is inside the set
        return p * at_max, 0.0
    scale = -x.min()
    y = x / scale

    def kl_and_slope(beta):
        e = p * torch.exp(beta * y)  # y <= 0 with max 0: no overflow, and the sum is >= p(maxima) > 0
        total = e.sum()
        mean = (e * y).sum() / total
        kl = beta * mean - torch.log(total)
        return kl.item(), beta * ((e * (y - mean) ** 2).sum() / total).item()

    beta = math.sqrt(2.0 * rho / (p * (y - (p * y).sum()) ** 2).sum().item())  # KL ~ beta^2 Var_p(y) / 2
    beta = _kl_beta(kl_and_slope, rho, beta, iters)
    q = torch.softmax(beta * y + torch.log(p), 0)
    return q, scale.item() / beta if beta > 0 else math.inf


def robust_prompt_weights(losses: torch.Tensor, prompt_ids: torch.Tensor, dro: DROArgs, groups=None, domains=None):
    """The worst case over the prompts of the *global* batch, as a weight for each of this process's losses.

    `losses` are this process's detached losses (one per pair or rollout), `prompt_ids` the prompt of each. Under
    torch.distributed the losses of all ranks are gathered first, so the worst case is over the whole batch. A
    prompt's loss l_i is the mean of its n_i losses (of the N in the global batch), and q* is computed over the B
    prompts in the ball around the batch's empirical prompt distribution p0_i = n_i / N; each loss of prompt i gets
    q*_i / n_i, so the weights of all ranks sum to 1 and rho = 0 (or --dro.kind erm) gives exactly 1/N each: the
    plain mean over pairs, as TRL's trainers compute it. Returns (weights, dict of diagnostics).
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
    stats.update(
        {
            "dro/robust_loss": (q * prompt_losses).sum().item(),
            "dro/erm_loss": all_losses.double().mean().item(),  # = sum p0_i l_i, the plain mean over pairs
            "dro/max_weight_x_B": (q / p0).max().item(),
            "dro/ess_fraction": q.sum().item() ** 2 / (q.square() / p0).sum().item(),
            "dro/dual": dual,
        }
    )
    return weights[offset : offset + losses.numel()].to(losses.dtype), stats
