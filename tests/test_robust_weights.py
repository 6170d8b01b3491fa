"""robust_weights against independent solvers (scipy linprog and the convex duals), edge cases, invariances."""

import math

import numpy as np
import pytest
import torch
import tyro
from scipy.optimize import linprog, minimize_scalar

import common
import robust

KINDS_RADII = [
    ("tv", 0.05),
    ("tv", 0.3),
    ("tv", 0.9),
    ("cvar", 0.5),
    ("cvar", 3.0),
    ("chi2", 0.1),
    ("chi2", 1.0),
    ("chi2", 10.0),
    ("kl", 0.05),
    ("kl", 0.7),
    ("kl", 3.0),
]


def worst_case_value(l: np.ndarray, kind: str, rho: float, p0=None) -> float:
    """max_{q in Q_rho} q . l, Q_rho around p0 (None: uniform), by a method that shares nothing with robust_weights."""
    B = len(l)
    p0 = np.full(B, 1 / B) if p0 is None else np.asarray(p0, dtype=float)
    if kind in ("tv", "cvar"):  # linear programs
        if kind == "tv":  # variables q (B) and t >= |q - p0| (B): sum t <= 2 rho
            c = np.concatenate([-l, np.zeros(B)])
            eye = np.eye(B)
            A_ub = np.block([[eye, -eye], [-eye, -eye], [np.zeros((1, B)), np.ones((1, B))]])
            b_ub = np.concatenate([p0, -p0, [2 * rho]])
            A_eq = np.concatenate([np.ones(B), np.zeros(B)])[None]
            res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=[1], bounds=[(0, None)] * (2 * B))
        else:
            res = linprog(-l, A_eq=np.ones((1, B)), b_eq=[1], bounds=[(0, (1 + rho) * p) for p in p0])
        return -res.fun
    if kind == "chi2":  # dual: inf_eta sqrt(1 + 2 rho) * sqrt(sum p0 (l - eta)_+^2) + eta   (Duchi & Namkoong)
        f = lambda eta: math.sqrt(1 + 2 * rho) * math.sqrt(np.sum(p0 * np.maximum(l - eta, 0) ** 2)) + eta
        lo, hi = l.min() - 10 * (np.ptp(l) + 1), l.max()
        return min(minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12}).fun, l.max())
    # kl dual: inf_tau tau * log sum p0 exp(l / tau) + tau * rho
    f = lambda log_tau: (
        math.exp(log_tau) * (np.log(np.sum(p0 * np.exp((l - l.max()) / math.exp(log_tau)))) + rho) + l.max()
    )
    return min(minimize_scalar(f, bounds=(-30, 30), method="bounded", options={"xatol": 1e-12}).fun, l.max())


def divergence(q: np.ndarray, kind: str, rho: float, p0=None) -> bool:
    """Whether q lies in Q_rho around p0 (None: uniform)."""
    B = len(q)
    p0 = np.full(B, 1 / B) if p0 is None else np.asarray(p0, dtype=float)
    if kind == "tv":
        return 0.5 * np.abs(q - p0).sum() <= rho + 1e-9
    if kind == "cvar":
        return np.all(q <= (1 + rho) * p0 + 1e-12)
    if kind == "chi2":
        return 0.5 * (p0 * (q / p0 - 1) ** 2).sum() <= rho + 1e-7
    return np.sum(q[q > 0] * np.log(q[q > 0] / p0[q > 0])) <= rho + 1e-7


def random_losses(rng, B):
    kind = rng.integers(4)
    if kind == 0:
        return rng.exponential(size=B)
    if kind == 1:  # many ties
        return rng.integers(0, 3, size=B).astype(float)
    if kind == 2:  # a tied maximum
        l = rng.random(B)
        l[: max(1, B // 3)] = 2.0
        return l
    return 10.0 ** rng.uniform(-8, 4, size=B)  # 1e-8 .. 1e4


@pytest.mark.parametrize("kind,rho", KINDS_RADII)
def test_matches_independent_solver(kind, rho):
    rng = np.random.default_rng(0)
    for trial in range(25):
        B = int(rng.choice([1, 2, 3, 7, 16, 50]))
        l = random_losses(rng, B)
        q = robust.robust_weights(torch.tensor(l), kind, rho).numpy()
        assert q.dtype == np.float64 and np.all(q >= 0) and abs(q.sum() - 1) < 1e-12, (trial, q)
        assert divergence(q, kind, rho), (trial, l, q)
        expected = worst_case_value(l, kind, rho)
        scale = max(1.0, np.abs(l).max())
        assert q @ l == pytest.approx(expected, abs=1e-6 * scale, rel=1e-6), (trial, B, l, q)


@pytest.mark.parametrize("kind,rho", KINDS_RADII + [("erm", 1.0)])
def test_invariances(kind, rho):
    rng = np.random.default_rng(1)
    l = torch.tensor(np.round(rng.exponential(size=40), 1))  # rounding makes ties
    q = robust.robust_weights(l, kind, rho)
    perm = torch.randperm(40)
    assert torch.allclose(robust.robust_weights(l[perm], kind, rho), q[perm], atol=1e-12)
    assert torch.allclose(robust.robust_weights(l + 123.0, kind, rho), q, atol=1e-9)
    for value in l.unique():  # equal losses get equal weights
        assert torch.allclose(q[l == value], q[l == value].mean().expand((l == value).sum()), atol=1e-12)


@pytest.mark.parametrize("kind", robust.DRO_KINDS)
def test_rho_zero_and_trivial_batches_are_uniform(kind):
    l = torch.rand(9)
    assert torch.equal(robust.robust_weights(l, kind, 0.0), torch.full((9,), 1 / 9, dtype=torch.float64))
    assert torch.equal(robust.robust_weights(torch.tensor([3.0]), kind, 0.5), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(
        robust.robust_weights(torch.full((5,), 2.0), kind, 0.5), torch.full((5,), 0.2, dtype=torch.float64)
    )


@pytest.mark.parametrize("kind,rho", [("tv", 1.0), ("cvar", 1e6), ("chi2", 1e6), ("kl", 1e6)])
def test_extreme_radius_is_point_mass_spread_over_tied_maxima(kind, rho):
    l = torch.tensor([0.1, 5.0, 2.0, 5.0, 0.3])
    q = robust.robust_weights(l, kind, rho)
    assert torch.allclose(q, torch.tensor([0, 0.5, 0, 0.5, 0], dtype=torch.float64), atol=1e-12)


def test_ties_at_maximum_beyond_what_they_absorb():
    # tv 0.6 from a batch of 5 with two maxima: the maxima can absorb all of it, shared equally
    q = robust.robust_weights(torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0]), "tv", 0.6)
    assert torch.allclose(q, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64))


def test_no_nan_over_wide_range_and_dual():
    l = torch.logspace(-8, 4, 1000)
    for kind, rho in KINDS_RADII:
        q, dual = robust.robust_weights(l, kind, rho, return_dual=True)
        assert torch.isfinite(q).all() and abs(q.sum().item() - 1) < 1e-12
    q, eta = robust.robust_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), "tv", 0.3, return_dual=True)
    assert eta == 2.0  # the rho-quantile of the losses


def test_bad_input():
    with pytest.raises(ValueError, match="unknown DRO kind"):
        robust.robust_weights(torch.rand(3), "wasserstein", 0.1)
    with pytest.raises(ValueError, match="invalid radius"):
        robust.robust_weights(torch.rand(3), "chi2", -0.1)
    with pytest.raises(ValueError, match="invalid radius"):
        robust.robust_weights(torch.rand(3), "tv", 1.5)
    with pytest.raises(ValueError, match="NaN"):
        robust.robust_weights(torch.tensor([1.0, float("nan")]), "kl", 0.1)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        robust.robust_weights(torch.rand(2, 2), "kl", 0.1)


@pytest.mark.parametrize(
    "argv,message",
    [(["--rho", "-1"], ">= 0"), (["--kind", "tv", "--rho", "1.5"], "[0, 1]"), (["--kind", "foo"], "erm")],
)
def test_droargs_rejects_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit):
        tyro.cli(robust.DROArgs, args=argv)
    assert message in capsys.readouterr().err


def test_pair_weights_group_by_prompt():
    # two pairs of prompt 7 (mean loss 2) and one of prompt 3 (loss 1): prompt-level weights, split over pairs. The
    # centre is p0 = (2/3, 1/3); cvar 1 caps prompt 7 at 4/3, so q = (1, 0)
    w, stats = robust.robust_prompt_weights(
        torch.tensor([1.0, 3.0, 1.0]), torch.tensor([7, 7, 3]), robust.DROArgs("cvar", 1.0)
    )
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 0.0]))
    assert stats["dro/robust_loss"] == pytest.approx(2.0) and stats["dro/erm_loss"] == pytest.approx(5 / 3)
    # relative to p0, i.e. over the 3 pairs: max q_i / p0_i = 3 * 0.5; ESS (sum w)^2 / sum w^2 = 2 of 3 pairs
    assert stats["dro/max_weight_x_B"] == pytest.approx(1.5) and stats["dro/ess_fraction"] == pytest.approx(2 / 3)


def badly_scaled(rng, B):
    """Losses spread over the float64 range: both signs, magnitudes 1e-300..1e300, huge gaps, ties."""
    kind = rng.integers(3)
    if kind == 0:
        return rng.choice([-1, 1], size=B) * 10.0 ** rng.uniform(-300, 300, size=B)
    if kind == 1:  # half the batch far below the rest
        x = rng.exponential(size=B)
        x[: B // 2] -= 10.0 ** rng.uniform(7, 300)
        return x
    return np.round(rng.normal(size=B)) * 10.0 ** rng.uniform(-300, 300)  # ties at a huge scale


@pytest.mark.parametrize("losses", [[-1e30, -2e30, 0.0, 1.0], [1e300, -1e300, 0.0], [1.7e308, -1.7e308, 3.0]])
@pytest.mark.parametrize("kind,rho", KINDS_RADII)
def test_extreme_spreads_are_exact_and_finite(losses, kind, rho):
    l = np.array(losses)
    q = robust.robust_weights(torch.tensor(l), kind, rho).numpy()
    assert np.isfinite(q).all() and np.all(q >= 0) and abs(q.sum() - 1) < 1e-12 and divergence(q, kind, rho)
    scaled = l / np.ptp(l / 4) / 4  # q* is invariant to positive scaling: the independent solver sees a unit range
    assert q @ scaled == pytest.approx(worst_case_value(scaled, kind, rho), abs=1e-6)


def chi2_optimality(l, q, rho):
    """The KKT conditions of max q.l over the chi2 ball, checked directly: q_i = a (l_i - eta) on the support with a
    common a > 0 and eta, no loss above eta outside it, and the constraint tight (unless q is a point mass)."""
    B, pos = len(l), q > 0
    if pos.sum() >= 2:
        a, b = np.polyfit(l[pos] - l.max(), q[pos], 1)  # q = a l + b on the support
        assert a > 0 and np.allclose(a * (l[pos] - l.max()) + b, q[pos], rtol=1e-9, atol=1e-12)
        eta = -b / a + l.max()
        assert np.all(l[~pos] <= eta + 1e-9 * max(1.0, abs(eta)))
        assert ((B * q - 1) ** 2).sum() / (2 * B) == pytest.approx(rho, rel=1e-6)


def test_chi2_with_half_the_batch_far_below_is_exact():
    """Measured before: 25 of 600 such batches at a 1e7 gap, 489 of 600 at 1e8, raised a RuntimeError."""
    rng = np.random.default_rng(3)
    for gap in (1e7, 1e8, 1e12):
        for _ in range(40):
            l = rng.exponential(size=64)
            l[:32] -= gap
            q = robust.robust_weights(torch.tensor(l), "chi2", 0.5).numpy()
            assert divergence(q, "chi2", 0.5)
            chi2_optimality(l, q, 0.5)


@pytest.mark.parametrize("kind,rho", KINDS_RADII)
def test_badly_scaled_stress(kind, rho):
    rng = np.random.default_rng(4)
    for trial in range(60):
        B = int(rng.choice([2, 3, 7, 16, 64]))
        l = badly_scaled(rng, B)
        q = robust.robust_weights(torch.tensor(l), kind, rho).numpy()
        assert np.isfinite(q).all() and np.all(q >= 0) and abs(q.sum() - 1) < 1e-12, (trial, l, q)
        assert divergence(q, kind, rho), (trial, l, q)
        for value in np.unique(l):  # equal losses, equal weights
            assert np.ptp(q[l == value]) <= 1e-12


@pytest.mark.parametrize("kind", robust.DRO_KINDS)
@pytest.mark.parametrize("rho", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_radius_is_rejected(kind, rho):
    with pytest.raises(ValueError, match="invalid radius rho="):
        robust.robust_weights(torch.rand(4), kind, rho)


def test_group_dro_with_one_group_is_erm():
    losses, prompts = torch.tensor([1.0, 3.0, 0.5, 2.0]), torch.tensor([0, 0, 1, 2])
    groups = robust.GroupWeights(["all"], torch.ones(1, dtype=torch.float64))
    w, _ = robust.robust_prompt_weights(losses, prompts, robust.DROArgs("group"), groups, ["all"] * 4)
    erm, _ = robust.robust_prompt_weights(losses, prompts, robust.DROArgs("erm"))
    assert torch.equal(w, erm)


def test_group_dro_update_equals_a_straightforward_implementation():
    """Sagawa et al.'s online group DRO, written plainly: per-domain mean loss over the domain's pairs (0 for a domain
    absent from the batch), q_g <- q_g exp(step loss_g) / Z, each pair gets q_g / (pairs of g in the batch): with a
    single domain, the plain mean over pairs, as every kind at rho = 0."""
    rng = np.random.default_rng(5)
    names, step = ["chat", "reasoning", "safety"], 0.3
    groups = robust.GroupWeights(list(names), torch.full((3,), 1 / 3, dtype=torch.float64))
    q = {g: 1 / 3 for g in names}
    for batch in range(4):
        n = 9
        prompts = rng.integers(0, 5, size=n)  # pairs of 5 prompts
        domain_of_prompt = {p: names[rng.integers(0, 3 if batch else 2)] for p in range(5)}  # batch 0 lacks safety
        domains = [domain_of_prompt[p] for p in prompts]
        losses = rng.exponential(size=n).astype(np.float32).astype(np.float64)  # the losses are float32
        w, stats = robust.robust_prompt_weights(
            torch.tensor(losses), torch.tensor(prompts), robust.DROArgs("group", 0.0, step), groups, domains
        )
        members = {g: [i for i in range(n) if domains[i] == g] for g in names}
        for g in names:
            q[g] *= math.exp(step * (sum(losses[i] for i in members[g]) / len(members[g]) if members[g] else 0.0))
        total = sum(q.values())
        q = {g: v / total for g, v in q.items()}
        for i in range(n):
            assert w[i].item() == pytest.approx(q[domains[i]] / len(members[domains[i]]), rel=1e-6)
        assert stats["dro/group_weight/chat"] == pytest.approx(q["chat"], rel=1e-12)
    with pytest.raises(common.ArgumentError, match="at least two domains"):
        robust.GroupWeights.start(robust.DROArgs("group"), ["all", "all"])


# ----------------------------------------------------------------------------------------------
# The ball around a non-uniform centre p0 (robust_prompt_weights: p0_i = n_i / N)
# ----------------------------------------------------------------------------------------------


def random_centre(rng, B):
    """A non-uniform centre: empirical prompt frequencies n_i / N, a Dirichlet draw (tiny entries), or one prompt
    holding nearly all the mass."""
    kind = rng.integers(3)
    if kind == 0:
        n = rng.integers(1, 6, size=B)
        return n / n.sum()
    if kind == 1:
        return rng.dirichlet(np.full(B, 0.5))
    p = np.full(B, 1e-3)
    p[rng.integers(B)] = 1.0
    return p / p.sum()


def weights_and_ratio(l, kind, rho, p0):
    q = robust.robust_weights(torch.tensor(l), kind, rho, p0=torch.tensor(p0)).numpy()
    return q, q / p0


def assert_ties_share_relative_to_p0(l, r):
    for value in np.unique(l):  # equal losses, equal q_i / p0_i
        assert np.ptp(r[l == value]) <= 1e-12 * r[l == value].max(), (l, r)


@pytest.mark.parametrize("kind,rho", KINDS_RADII)
def test_centre_matches_independent_solver(kind, rho):
    rng = np.random.default_rng(10)
    for trial in range(25):
        B = int(rng.choice([1, 2, 3, 7, 16, 50]))
        l, p0 = random_losses(rng, B), random_centre(rng, B)
        q, r = weights_and_ratio(l, kind, rho, p0)
        assert q.dtype == np.float64 and np.all(q >= 0) and abs(q.sum() - 1) < 1e-12, (trial, q)
        assert divergence(q, kind, rho, p0), (trial, l, p0, q)
        expected = worst_case_value(l, kind, rho, p0)
        scale = max(1.0, np.abs(l).max())
        assert q @ l == pytest.approx(expected, abs=1e-6 * scale, rel=1e-6), (trial, B, l, p0, q)
        assert_ties_share_relative_to_p0(l, r)


@pytest.mark.parametrize("kind,rho", KINDS_RADII)
def test_integer_centre_is_the_uniform_ball_over_repeated_entries(kind, rho):
    """With p0 = n / N, the worst case over B entries equals that of the uniform ball over N entries in which entry i
    appears n_i times (the original uniform code), each entry's copies summed: the two problems are the same."""
    rng = np.random.default_rng(11)
    for trial in range(25):
        B = int(rng.choice([2, 3, 7, 16]))
        l, n = random_losses(rng, B), rng.integers(1, 5, size=B)
        q, _ = weights_and_ratio(l, kind, rho, n / n.sum())
        copies = robust.robust_weights(torch.tensor(np.repeat(l, n)), kind, rho).numpy()
        summed = np.bincount(np.repeat(np.arange(B), n), weights=copies)
        scale = max(1.0, np.abs(l).max())
        assert q @ l == pytest.approx(summed @ l, abs=1e-6 * scale, rel=1e-6), (trial, l, n, q, summed)
        assert np.allclose(q, summed, atol=1e-6), (trial, l, n, q, summed)


@pytest.mark.parametrize("kind,rho", KINDS_RADII + [("erm", 1.0)])
def test_centre_invariances(kind, rho):
    rng = np.random.default_rng(12)
    l = torch.tensor(np.round(rng.exponential(size=40), 1))  # rounding makes ties
    p0 = torch.tensor(random_centre(rng, 40))
    q = robust.robust_weights(l, kind, rho, p0=p0)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(robust.robust_weights(l[perm], kind, rho, p0=p0[perm]), q[perm], atol=1e-12)
    assert torch.allclose(robust.robust_weights(l + 123.0, kind, rho, p0=p0), q, atol=1e-9)
    assert_ties_share_relative_to_p0(l.numpy(), (q / p0).numpy())


@pytest.mark.parametrize("kind,rho", KINDS_RADII)
def test_uniform_centre_is_no_centre(kind, rho):
    """p0 = None is the uniform centre torch.full((B,), 1 / B), so that one gives the same result bit for bit. A float32
    uniform centre (1/B rounded, then renormalised) is the same ball up to rounding: the worst case of the independent
    solver, within the tolerances of test_matches_independent_solver. (One solver serves every centre since the
    uniform-only copies were removed; the independent solvers, not the old code, are the reference.)"""
    rng = np.random.default_rng(13)
    for _ in range(10):
        B = int(rng.choice([2, 7, 50]))
        l = random_losses(rng, B)
        q, dual = robust.robust_weights(torch.tensor(l), kind, rho, True, torch.full((B,), 1 / B, dtype=torch.float64))
        q_none, dual_none = robust.robust_weights(torch.tensor(l), kind, rho, return_dual=True)
        assert torch.equal(q, q_none) and (dual == dual_none or math.isnan(dual) and math.isnan(dual_none))
        q = robust.robust_weights(torch.tensor(l), kind, rho, p0=torch.full((B,), 1 / B, dtype=torch.float32)).numpy()
        assert np.all(q >= 0) and abs(q.sum() - 1) < 1e-12 and divergence(q, kind, rho), (l, q)
        scale = max(1.0, np.abs(l).max())
        assert q @ l == pytest.approx(worst_case_value(l, kind, rho), abs=1e-6 * scale, rel=1e-6), (l, q)


@pytest.mark.parametrize("kind", robust.DRO_KINDS)
def test_rho_zero_and_trivial_batches_give_the_centre_exactly(kind):
    rng = np.random.default_rng(14)
    l = torch.rand(9, generator=torch.Generator().manual_seed(0))
    for p0 in (torch.tensor(random_centre(rng, 9)), torch.tensor(rng.dirichlet(np.ones(9)), dtype=torch.float32)):
        assert torch.equal(robust.robust_weights(l, kind, 0.0, p0=p0), p0.double())  # exactly as given
        assert torch.equal(robust.robust_weights(torch.full((9,), 2.0), kind, 0.5, p0=p0), p0.double())
    assert torch.equal(robust.robust_weights(torch.tensor([3.0]), kind, 0.5, p0=torch.ones(1)), torch.ones(1).double())
    p0 = torch.tensor(random_centre(rng, 9))
    assert torch.equal(robust.robust_weights(l, "erm", 0.7, p0=p0), p0)


@pytest.mark.parametrize("kind,rho", [("tv", 1.0), ("cvar", 1e6), ("chi2", 1e6), ("kl", 1e6)])
def test_centre_extreme_radius_is_point_mass_spread_over_tied_maxima_by_p0(kind, rho):
    l = torch.tensor([0.1, 5.0, 2.0, 5.0, 0.3])
    q = robust.robust_weights(l, kind, rho, p0=torch.tensor([0.1, 0.2, 0.3, 0.3, 0.1], dtype=torch.float64))
    assert torch.allclose(q, torch.tensor([0, 0.4, 0, 0.6, 0], dtype=torch.float64), atol=1e-12)


def test_centre_tv_and_cvar_by_hand():
    l, p0 = torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0]), torch.tensor([0.1, 0.2, 0.1, 0.4, 0.2], dtype=torch.float64)
    # tv 0.45: loss 0 gives up all its 0.4, loss 1 half of its 0.1; the maxima gain 0.45 in proportion 2 : 1
    q, eta = robust.robust_weights(l, "tv", 0.45, return_dual=True, p0=p0)
    assert torch.allclose(q, torch.tensor([0.05, 0.5, 0.25, 0.0, 0.2], dtype=torch.float64), atol=1e-12) and eta == 1.0
    # cvar 1: caps 2 p0; the maxima fill theirs (0.4 + 0.2), loss 2 the remaining 0.4 (exactly its cap)
    q = robust.robust_weights(l, "cvar", 1.0, p0=p0)
    assert torch.allclose(q, torch.tensor([0.0, 0.4, 0.2, 0.0, 0.4], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("kind,rho", KINDS_RADII)
def test_centre_badly_scaled_stress(kind, rho):
    rng = np.random.default_rng(15)
    for trial in range(60):
        B = int(rng.choice([2, 3, 7, 16, 64]))
        l, p0 = badly_scaled(rng, B), random_centre(rng, B)
        q, r = weights_and_ratio(l, kind, rho, p0)
        assert np.isfinite(q).all() and np.all(q >= 0) and abs(q.sum() - 1) < 1e-12, (trial, l, p0, q)
        assert divergence(q, kind, rho, p0), (trial, l, p0, q)
        assert_ties_share_relative_to_p0(l, r)
    l, p0 = torch.logspace(-8, 4, 1000, dtype=torch.float64), torch.tensor(random_centre(rng, 1000))
    q = robust.robust_weights(l, kind, rho, p0=p0)
    assert torch.isfinite(q).all() and abs(q.sum().item() - 1) < 1e-12 and divergence(q.numpy(), kind, rho, p0.numpy())


@pytest.mark.parametrize("losses", [[-1e30, -2e30, 0.0, 1.0], [1e300, -1e300, 0.0], [1.7e308, -1.7e308, 3.0]])
@pytest.mark.parametrize("kind,rho", KINDS_RADII)
def test_centre_extreme_spreads_are_exact_and_finite(losses, kind, rho):
    l = np.array(losses)
    p0 = np.arange(1, len(l) + 1) / np.arange(1, len(l) + 1).sum()
    q, _ = weights_and_ratio(l, kind, rho, p0)
    assert np.isfinite(q).all() and np.all(q >= 0) and abs(q.sum() - 1) < 1e-12 and divergence(q, kind, rho, p0)
    scaled = l / np.ptp(l / 4) / 4  # q* is invariant to positive scaling: the independent solver sees a unit range
    assert q @ scaled == pytest.approx(worst_case_value(scaled, kind, rho, p0), abs=1e-6)


def test_centre_bad_input():
    for p0, message in [
        (torch.tensor([0.5, 0.5]), "1-D tensor of 3"),
        ([0.2, 0.3, 0.5], "1-D tensor of 3"),
        (torch.tensor([0.5, 0.5, 0.0]), "positive probabilities"),
        (torch.tensor([0.6, 0.6, -0.2]), "positive probabilities"),
        (torch.tensor([0.2, 0.3, 0.6]), "summing to 1"),
        (torch.tensor([0.5, float("nan"), 0.5]), "positive probabilities"),
    ]:
        with pytest.raises(ValueError, match=message):
            robust.robust_weights(torch.rand(3), "chi2", 0.5, p0=p0)


def gamma(n, u=2.0**-53):
    """Higham's gamma_n = n u / (1 - n u): |prod of n factors (1 + delta_i)^(+-1) - 1| <= gamma_n, |delta_i| <= u."""
    return n * u / (1 - n * u)


def repeated_prompts(rng, N):
    """N pairs over prompts that repeat unequally (each pair's prompt drawn from about N / 3 prompts)."""
    ids = torch.tensor(rng.integers(0, max(1, N // 3), size=N))
    return torch.tensor(rng.exponential(size=N), dtype=torch.float32), ids


@pytest.mark.parametrize("kind,rho", [(kind, 0.0) for kind in robust.DRO_KINDS] + [("erm", 0.5)])
def test_prompt_weights_at_rho_zero_are_exactly_the_plain_mean(kind, rho):
    """rho = 0 (and erm) weight every pair exactly 1/N, as TRL's mean over pairs, however often prompts repeat."""
    rng = np.random.default_rng(16)
    for N in range(1, 65):
        losses, ids = repeated_prompts(rng, N)
        w, stats = robust.robust_prompt_weights(losses, ids, robust.DROArgs(kind, rho))
        assert torch.equal(w, torch.full((N,), 1 / N)), (N, ids, w)
        assert stats["dro/erm_loss"] == losses.double().mean().item()  # the plain mean over pairs
        assert stats["dro/max_weight_x_B"] == 1.0  # q_i / p0_i is exactly 1
        # sum_i p0_i l_i against the plain mean: prompt means (n_i - 1 sums, 1 division), p0_i = n_i / N (1
        # division), the product and the B - 1 sums <= n_i + B + 1 <= 2N + 1 roundings; the mean: N roundings
        tol = (gamma(2 * N + 1) + gamma(N)) * losses.double().abs().mean().item()
        assert abs(stats["dro/robust_loss"] - stats["dro/erm_loss"]) <= tol
        # (sum p0)^2 / sum p0^2 / p0: p0's sum is 1 to gamma(1 + B - 1); numerator <= 2B + 1, denominator 2 + B - 1
        B = len(ids.unique())
        assert abs(stats["dro/ess_fraction"] - 1) <= gamma(4 * B + 4)


@pytest.mark.parametrize("kind,rho", KINDS_RADII)
def test_prompt_weights_are_the_worst_case_around_the_empirical_prompt_distribution(kind, rho):
    """Each pair of prompt i gets q*_i / n_i with q* the worst case around p0 = n / N, which is also the worst case
    over the N pairs around the uniform with every pair carrying its prompt's mean loss (the original code)."""
    rng = np.random.default_rng(17)
    for _ in range(10):
        N = int(rng.choice([4, 9, 30]))
        losses, ids = repeated_prompts(rng, N)
        w, stats = robust.robust_prompt_weights(losses, ids, robust.DROArgs(kind, rho))
        _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        means = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, losses.double()) / counts
        q = robust.robust_weights(means, kind, rho, p0=counts.double() / N)
        torch.testing.assert_close(w, (q / counts)[inverse].float())
        torch.testing.assert_close(w, robust.robust_weights(means[inverse], kind, rho).float(), atol=1e-6, rtol=0)
        assert w.sum().item() == pytest.approx(1.0)
        assert stats["dro/robust_loss"] == pytest.approx((q * means).sum().item(), rel=1e-12)
        assert stats["dro/max_weight_x_B"] == pytest.approx(N * w.max().item(), rel=1e-6)
        assert stats["dro/ess_fraction"] == pytest.approx(w.sum().item() ** 2 / (N * w.square().sum().item()), rel=1e-6)
        if kind == "chi2" and counts.double().div(N)[means == means.max()].sum() * (1 + 2 * rho) < 1:
            assert stats["dro/ess_fraction"] == pytest.approx(1 / (1 + 2 * rho), rel=1e-6)  # the constraint is tight


@pytest.mark.parametrize("rho", [0.01, 0.3, 0.9])
def test_centre_tv_and_cvar_on_large_batches_equal_sorting(rho):
    """Beyond a few thousand losses the weighted quantile of tv and cvar is found by sampled pivots (and medians when
    a skewed p0 defeats them): the worst case must equal the sort-based one, for near-uniform, skewed and dominated
    centres (many prompts tied at the quantile's mass) and continuous, tied, ascending and descending losses."""
    rng = np.random.default_rng(18)
    B = 50_000
    for trial in range(12):
        l = [rng.exponential(size=B), rng.integers(0, 40, size=B).astype(float)][trial % 2]
        l = [l, np.sort(l), np.sort(l)[::-1].copy()][trial % 3]
        p0 = [rng.integers(1, 6, size=B).astype(float), np.exp(4 * rng.normal(size=B)), np.full(B, 1e-6)][trial % 4 % 3]
        p0[rng.integers(B)] += 0.5 if trial % 4 == 2 else 0.0
        p0 = p0 / p0.sum()
        order = np.argsort(l)
        s, ps = l[order], p0[order]
        # tv: rho max(l) + min_eta (1 - rho) eta + E_p0 (l - eta)_+, the minimum at a loss (DESIGN.md's dual form)
        tail_mass, tail_sum = np.cumsum(ps[::-1])[::-1], np.cumsum((ps * s)[::-1])[::-1]
        tv = rho * s[-1] + np.min((1 - rho) * s + tail_sum - s * tail_mass)
        # cvar: fill the caps (1 + rho) p0 from the largest loss down until the mass is 1
        caps = (1 + rho) * ps[::-1]
        cvar = np.minimum(caps, np.maximum(1 - np.concatenate([[0], np.cumsum(caps)[:-1]]), 0)) @ s[::-1]
        for kind, expected in (("tv", tv), ("cvar", cvar)):
            q = robust.robust_weights(torch.tensor(l), kind, rho, p0=torch.tensor(p0)).numpy()
            assert divergence(q, kind, rho, p0), (trial, kind)
            # both sides sum B terms, each to about B eps relatively: 1e-9 is far above either rounding
            assert q @ l == pytest.approx(expected, rel=1e-9), (trial, kind)
