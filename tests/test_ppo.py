"""Tests of dro_ppo.py: GAE, the PPO loss, rho = 0 == plain PPO, the cross-process parts, and smoke runs."""

import json
import os
import subprocess
import sys

import pytest
import torch

import common
import dro_ppo
import ingest
import lifecycle
import robust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_mask(n, t, gen):
    """Response masks of random lengths 1..t (ones then zeros)."""
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    return (torch.arange(t)[None] < lengths[:, None]).float()


def test_gae_matches_double_loop():
    gen = torch.Generator().manual_seed(0)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)]:
        rewards, values = (
            torch.randn(5, 7, generator=gen, dtype=torch.float64),
            torch.randn(5, 7, generator=gen, dtype=torch.float64),
        )
        mask = random_mask(5, 7, gen).double()
        adv, ret = dro_ppo.gae(rewards, values, mask, gamma, lam)
        for i in range(5):
            n = int(mask[i].sum())
            for t in range(7):
                expected = 0.0
                if t < n:  # A_t = sum_l (gamma lam)^l delta_{t+l}, V after the last real token is 0
                    for l in range(n - t):
                        v_next = values[i, t + l + 1].item() if t + l + 1 < n else 0.0
                        delta = rewards[i, t + l].item() + gamma * v_next - values[i, t + l].item()
                        expected += (gamma * lam) ** l * delta
                assert adv[i, t].item() == pytest.approx(expected, abs=1e-10)
                if t < n:
                    assert ret[i, t].item() == pytest.approx(expected + values[i, t].item(), abs=1e-10)


def make_rollout_batch(n_prompts=6, k=2, t=5, vocab=11, seed=3):
    gen = torch.Generator().manual_seed(seed)
    n = n_prompts * k
    mask = random_mask(n, t, gen)
    return {
        "tokens": torch.randint(0, vocab, (n, t), generator=gen),
        "mask": mask,
        "old_logprobs": -torch.rand(n, t, generator=gen) * 3,
        "advantages": torch.randn(n, t, generator=gen),
        "old_values": torch.randn(n, t, generator=gen),
        "returns": torch.randn(n, t, generator=gen),
        "returns_per_rollout": torch.randn(n, generator=gen),
        "groups": torch.arange(n_prompts).repeat_interleave(k),
        "k": k,
    }


def one_update(weights, batch, vocab=11):
    """One PPO step of a small linear 'policy' and 'critic' on a fixed rollout batch; returns the new parameters."""
    torch.manual_seed(0)
    policy, critic = torch.nn.Linear(4, vocab), torch.nn.Linear(4, 1)
    n, t = batch["tokens"].shape
    feats = torch.randn(n, t, 4, generator=torch.Generator().manual_seed(9))
    opt = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=1e-2)
    logprobs = torch.gather(policy(feats).log_softmax(-1), 2, batch["tokens"][..., None]).squeeze(-1)
    pg, vf, _ = dro_ppo.ppo_loss(
        logprobs,
        batch["old_logprobs"],
        batch["advantages"],
        critic(feats).squeeze(-1),
        batch["old_values"],
        batch["returns"],
        batch["mask"],
        weights,
    )
    (pg + 0.1 * vf).backward()
    opt.step()
    return pg.detach(), [p.detach().clone() for p in list(policy.parameters()) + list(critic.parameters())]


def prompt_weights(batch, dro, weights_from="returns"):
    """The rollout weights of a batch by each estimator of --weights-from ("values": V(x) is random here)."""
    losses = -batch["returns_per_rollout"]
    if weights_from == "loo":
        return dro_ppo.cross_fitted_weights(losses, batch["groups"], dro, batch["k"])
    if weights_from == "values":
        losses = torch.randn(len(losses), generator=torch.Generator().manual_seed(5))
    return robust.robust_prompt_weights(losses, batch["groups"], dro)


@pytest.mark.parametrize("weights_from", ["returns", "values", "loo"])
@pytest.mark.parametrize("kind", ["chi2", "tv", "kl", "cvar", "erm"])
def test_rho_zero_is_plain_ppo(kind, weights_from):
    batch = make_rollout_batch(k=3)
    w, stats = prompt_weights(batch, robust.DROArgs(kind=kind, rho=0.0), weights_from)
    loss_dro, params_dro = one_update(w, batch)
    loss_plain, params_plain = one_update(None, batch)  # ppo_loss's own plain mean
    assert torch.equal(loss_dro, loss_plain)  # bit for bit: the same loss and the same update
    for a, b in zip(params_dro, params_plain):
        assert torch.equal(a, b)
    if kind != "erm":  # and a positive radius changes the update
        w, _ = prompt_weights(batch, robust.DROArgs(kind=kind, rho=0.5), weights_from)
        assert not torch.allclose(one_update(w, batch)[0], loss_plain)


@pytest.mark.parametrize("kind", ["chi2", "tv", "kl", "cvar"])
def test_cross_fitted_weight_ignores_its_own_return(kind):
    """--weights-from loo: each rollout's weight is q_i / K of the worst case over the prompts' other rollouts (a
    direct computation with robust_weights), so changing a rollout's own return leaves its weight as it was."""
    dro, k = robust.DROArgs(kind=kind, rho=0.5), 3
    batch = make_rollout_batch(n_prompts=8, k=k, seed=7)
    losses = -batch["returns_per_rollout"]
    w, _ = dro_ppo.cross_fitted_weights(losses, batch["groups"], dro, k)
    per_prompt = losses.view(-1, k)
    for j in range(k):
        others = per_prompt[:, [i for i in range(k) if i != j]].mean(1)
        q = robust.robust_weights(others, kind, 0.5)
        torch.testing.assert_close(w.view(-1, k)[:, j], (q / k).float())
    assert w.sum().item() == pytest.approx(1.0)
    seen = 0
    for r in range(len(losses)):
        changed = losses.clone()
        changed[r] += 50.0
        w2, _ = dro_ppo.cross_fitted_weights(changed, batch["groups"], dro, k)
        assert w2[r] == w[r]  # its own weight is untouched ...
        seen += not torch.allclose(w2, w)
    assert seen >= len(losses) // 2  # ... while the other rollouts' weights see the change (tv, cvar: if it moves q)
    plug_in, _ = robust.robust_prompt_weights(losses, batch["groups"], dro)
    assert not torch.allclose(plug_in, w)  # (the plug-in weight of a rollout does move with its own return)


def test_ppo_loss_matches_straightforward_computation():
    batch = make_rollout_batch(seed=5)
    n, t = batch["tokens"].shape
    gen = torch.Generator().manual_seed(6)
    logprobs, values = (
        batch["old_logprobs"] + 0.3 * torch.randn(n, t, generator=gen),
        batch["old_values"] + 0.5 * torch.randn(n, t, generator=gen),
    )
    w = torch.rand(n, generator=gen)
    w /= w.sum()
    pg, vf, _ = dro_ppo.ppo_loss(
        logprobs,
        batch["old_logprobs"],
        batch["advantages"],
        values,
        batch["old_values"],
        batch["returns"],
        batch["mask"],
        w,
        0.2,
        0.2,
    )
    exp_pg, vf_sum, tokens = 0.0, 0.0, 0
    for i in range(n):
        per = []
        for j in range(t):
            if batch["mask"][i, j]:
                r, a = (logprobs[i, j] - batch["old_logprobs"][i, j]).exp().item(), batch["advantages"][i, j].item()
                per.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
                v, v0, ret = values[i, j].item(), batch["old_values"][i, j].item(), batch["returns"][i, j].item()
                vc = v0 + min(max(v - v0, -0.2), 0.2)
                vf_sum += 0.5 * max((v - ret) ** 2, (vc - ret) ** 2)
                tokens += 1
        exp_pg += w[i].item() * sum(per) / t  # summed over the rollout's tokens, over a constant (not its length)
    assert pg.item() == pytest.approx(exp_pg, rel=1e-5)
    assert vf.item() == pytest.approx(vf_sum / tokens, rel=1e-5)


def test_robust_weights_favour_low_return_prompts():
    batch = make_rollout_batch()
    w, _ = robust.robust_prompt_weights(
        -batch["returns_per_rollout"], batch["groups"], robust.DROArgs(kind="chi2", rho=0.5)
    )
    per_prompt_return = batch["returns_per_rollout"].view(-1, 2).mean(1)
    per_prompt_w = w.view(-1, 2).sum(1)
    assert per_prompt_w.sum().item() == pytest.approx(1.0)
    assert per_prompt_w[per_prompt_return.argmin()] == per_prompt_w.max()
    assert torch.equal(w.view(-1, 2)[:, 0], w.view(-1, 2)[:, 1])  # rollouts of one prompt share its weight


def _whiten_and_weigh_on_rank(rank, x, mask, returns, groups, store, out):
    """One of 2 gloo processes: whiten and weigh this rank's half of a rollout batch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)  # (no port to collide)
    half = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
    w, _ = robust.robust_prompt_weights(-returns[half], groups[half], robust.DROArgs(kind="chi2", rho=0.5))
    loo, _ = dro_ppo.cross_fitted_weights(-returns[half], groups[half], robust.DROArgs(kind="chi2", rho=0.5), 2)
    out[rank] = (dro_ppo.masked_whiten(x[half], mask[half]), w, loo)
    dist.destroy_process_group()


def test_cross_process_parts_equal_one_process(tmp_path):
    """Under torchrun the only cross-rank quantities of a PPO iteration are the advantage whitening and the
    robust weights (plug-in and cross-fitted): with the rollout batch split over 2 processes they equal those of
    one process."""
    import torch.multiprocessing as mp

    batch = make_rollout_batch(seed=3)
    x, mask = torch.randn(batch["mask"].shape, generator=torch.Generator().manual_seed(4)), batch["mask"]
    out = mp.Manager().dict()
    mp.spawn(
        _whiten_and_weigh_on_rank,
        args=(x, mask, batch["returns_per_rollout"], batch["groups"], tmp_path / "store", out),
        nprocs=2,
    )
    w, _ = robust.robust_prompt_weights(
        -batch["returns_per_rollout"], batch["groups"], robust.DROArgs(kind="chi2", rho=0.5)
    )
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), dro_ppo.masked_whiten(x, mask))
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), w)
    loo, _ = dro_ppo.cross_fitted_weights(
        -batch["returns_per_rollout"], batch["groups"], robust.DROArgs(kind="chi2", rho=0.5), 2
    )
    torch.testing.assert_close(torch.cat([out[0][2], out[1][2]]), loo)  # the cross-fitted worst case too
    whitened = dro_ppo.masked_whiten(x, mask)
    assert masked_mean_all(whitened, mask) == pytest.approx(0.0, abs=1e-6)
    assert masked_mean_all(whitened.square(), mask) == pytest.approx(1.0, abs=1e-4)


def masked_mean_all(x, mask):
    return ((x * mask).sum() / mask.sum()).item()


def run_script(out, *flags, launcher=(sys.executable,)):
    cmd = [
        *launcher,
        os.path.join(ROOT, "dro_ppo.py"),
        "--sft-steps",
        "5",
        "--total-steps",
        "2",
        "--batch-size",
        "8",
        "--max-train-rows",
        "64",  # (tokenizing all 8000 training prompts takes longer than the run)
        "--max-eval-rows",
        "16",
        "--output-dir",
        str(out),
        *flags,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_smoke_run(tmp_path):
    out = tmp_path / "run"
    proc = run_script(out, "--eval-every", "1")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    splits = [s for s in common.SYNTHETIC_SPLITS if s != "train"]
    assert {r["step"] for r in rows} == {0, 1, 2}
    for r in rows:
        assert r["split"] in splits and r["kl"] >= 0
        assert {"gold_reward", "worst_domain_gold_reward", "domain_gold_reward"} <= r.keys()
    assert os.path.exists(out / "model" / "config.json") and not os.path.exists(str(out / "model") + ".tmp")
    assert "gold_reward, after 2 PPO iterations" in proc.stdout


@pytest.mark.parametrize("savers", [[], ["--lora-r", "4", "--gradient-checkpointing"]], ids=["full", "lora"])
def test_torchrun_two_processes(tmp_path, savers):
    """2 processes (gloo) each roll out half of the batch; rank 0 evaluates, logs and saves (the critic's V(x); with
    LoRA the policy and the critic are two DDP models over the same frozen weights)."""
    out = tmp_path / "ddp"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")  # a free port
    flags = ("--dro.kind", "chi2", "--weights-from", "values", "--baseline", "critic", "--target-kl", "1.0", *savers)
    run_script(out, *flags, launcher=torchrun)  # (the adaptive KL reduces the batch's KL over the processes)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert {r["step"] for r in rows} == {0, 2} and os.path.exists(out / "model" / "config.json")


def test_too_long_prompt_is_an_error_naming_the_row(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "dro_ppo.py"), "--max-prompt-length", "12", "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "synthetic train, row " in proc.stderr and "--max-prompt-length 12" in proc.stderr
    assert not os.path.exists(tmp_path / "model")


@pytest.mark.parametrize("baseline", ["rloo", "critic"])
def test_script_rho_zero_equals_erm(tmp_path, baseline):
    """End to end: --dro.rho 0 trains exactly the model that plain PPO (--dro.kind erm) trains, with either baseline."""
    from safetensors.torch import load_file

    run_script(tmp_path / "rho0", "--dro.kind", "tv", "--dro.rho", "0", "--max-eval-rows", "4", "--baseline", baseline)
    run_script(tmp_path / "erm", "--dro.kind", "erm", "--max-eval-rows", "4", "--baseline", baseline)
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("rho0", "erm"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluations_neither_change_training_nor_differ_by_anything_but_the_policy(tmp_path):
    """Each evaluation samples its own fixed random stream: --eval-every changes no trained weight, and two runs'
    step-0 evaluations of the same reference agree exactly (so step 0 and the end differ by the policy alone)."""
    from safetensors.torch import load_file

    run_script(tmp_path / "every", "--eval-every", "1", "--dro.kind", "erm")
    run_script(tmp_path / "ends", "--eval-every", "0", "--dro.kind", "erm")
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("every", "ends"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = {r: [json.loads(line) for line in open(tmp_path / r / "metrics.jsonl")] for r in ("every", "ends")}
    assert {row["step"] for row in rows["every"]} == {0, 1, 2} and {row["step"] for row in rows["ends"]} == {0, 2}
    for row in rows["every"] + rows["ends"]:
        del row["run_id"]
    assert [row for row in rows["every"] if row["step"] != 1] == rows["ends"]
    assert len({row["gold_reward"] for row in rows["ends"]}) > 1  # (the comparison sees sampled responses)


def test_smoke_run_with_reward_model(tmp_path):
    """Training on a learned reward model (a random tiny one here): eval also reports its score and the gap to gold."""
    from transformers import AutoModelForSequenceClassification

    tok = common.tiny_tokenizer()
    rm = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    lifecycle.save_atomically(rm, tok, str(tmp_path / "rm"))
    run_script(tmp_path / "run", "--reward-model-path", str(tmp_path / "rm"), "--max-eval-rows", "8")
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    for r in rows:
        assert {"gold_reward", "kl", "reward_model_score", "domain_reward_model_score", "reward_gap"} <= r.keys()
        assert r["reward_gap"] == pytest.approx(r["reward_model_score"] - r["gold_reward"])


@pytest.mark.parametrize("kind", ["chi2", "kl", "tv", "cvar"])
def test_groups_theory_worst_case_is_the_scripts(kind):
    """bench/groups_theory.py's closed-form worst-case minority mass q_max equals what robust.robust_weights puts on
    a batch whose 15% minority prompts have the larger loss (the population worst case of synthetic-groups)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import groups_theory

    losses = torch.tensor([1.0] * 15 + [0.0] * 85, dtype=torch.float64)
    for rho in (0.05, 0.25, 0.5, 1.0, 3.0):
        rho = min(rho, 1.0) if kind == "tv" else rho  # a total variation is at most 1
        q = robust.robust_weights(losses, kind, rho)
        assert q[:15].sum().item() == pytest.approx(groups_theory.q_max(kind, rho), abs=1e-6)


def test_adaptive_kl_controller_is_zieglers():
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * rollouts / horizon), by hand; KL on target keeps beta."""
    assert dro_ppo.adapted_kl_coef(0.1, 2.2, 2.0, 128, 10_000) == pytest.approx(0.1 * (1 + 0.1 * 0.0128), rel=1e-15)
    assert dro_ppo.adapted_kl_coef(0.1, 9.0, 2.0, 128, 1_000) == pytest.approx(0.1 * (1 + 0.2 * 0.128), rel=1e-15)
    assert dro_ppo.adapted_kl_coef(0.1, 0.0, 2.0, 128, 1_000) == pytest.approx(0.1 * (1 - 0.2 * 0.128), rel=1e-15)
    assert dro_ppo.adapted_kl_coef(0.1, 2.0, 2.0, 128, 1_000) == 0.1


def test_target_kl_adapts_beta_from_each_batchs_kl(tmp_path):
    """End to end: the beta of each iteration (objective/kl_coef) is the controller folded over the KLs logged before
    it, starting from --kl-coef; a resumed run restores the adapted beta (checkpoint), not --kl-coef."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = (
        "--target-kl",
        "0.01",
        "--kl-horizon",
        "20",
        "--kl-coef",
        "0.5",
        "--samples-per-prompt",
        "2",  # 8 prompts x 2: 16 rollouts per iteration below
        "--total-steps",
        "4",
        "--max-eval-rows",
        "4",
    )
    run_script(tmp_path / "run", *flags)
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    kls = [e.value for e in events.Scalars("objective/kl")]
    betas = [e.value for e in events.Scalars("objective/kl_coef")]
    expected = [0.5]
    for kl in kls[:-1]:
        expected.append(dro_ppo.adapted_kl_coef(expected[-1], kl, 0.01, 16, 20))
    assert betas == pytest.approx(expected, rel=1e-6) and betas[-1] != 0.5  # (TensorBoard stores float32)


def test_reward_model_scores_are_relative_to_the_chosen_response(tmp_path):
    """--score-baseline chosen: a rollout is scored r(x, y) - r(x, y_chosen), so a per-prompt constant that
    Bradley-Terry cannot see is gone; a rollout that is the chosen response scores 0."""
    from transformers import AutoModelForSequenceClassification

    tok = common.tiny_tokenizer()
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1)).eval()
    data = dro_ppo.load_prompts("synthetic", "validation", tok, 64, max_rows=6)
    baseline = dro_ppo.score_baselines(rm, data, tok.pad_token_id, "chosen")
    assert torch.equal(baseline, common.sequence_rewards(rm, data["chosen"], tok.pad_token_id))
    assert torch.equal(dro_ppo.score_baselines(rm, data, tok.pad_token_id, "none"), torch.zeros(6))
    rows = list(ingest.load_preferences("synthetic", "validation", tok, max_rows=6))
    responses = [common.encode(tok, r["chosen"]) for r in rows]  # each chosen response as a rollout (ByT5 adds EOS)
    ids, mask = common.pad(responses, tok.pad_token_id)
    scores = dro_ppo.rollout_scores(tok, rm, data["text"], data["domain"], data["chat"], ids, mask)
    assert torch.equal(scores, baseline)


def test_policy_pairs_are_labelled_by_the_gold_reward(tmp_path):
    """bench/policy_pairs.py (the reward model's data from a policy's own samples): every pair is in the preference
    schema, its chosen response has the larger gold reward, demo.jsonl adds the demonstration against a sample, and
    a next round (--policy, --previous) is the previous file followed by the new policy's pairs."""
    script = os.path.join(ROOT, "bench", "policy_pairs.py")
    base = [sys.executable, script, "--seed", "3", "--max-rows", "80", "--samples", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for flags in (
        ["--sft-steps", "60", "--out", str(tmp_path / "r1")],
        [
            "--policy",
            str(tmp_path / "r1" / "sft"),
            "--previous",
            str(tmp_path / "r1" / "demo.jsonl"),
            "--out",
            str(tmp_path / "r2"),
        ],
    ):
        proc = subprocess.run(base + flags, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    files = {
        f"{r}/{n}": [json.loads(line) for line in open(tmp_path / r / f"{n}.jsonl")]
        for r in ("r1", "r2")
        for n in ("samples", "demo", "mix")
    }
    demos = {row["prompt"]: row["chosen"] for row in ingest.load_preferences("synthetic", "train", None, max_rows=80)}
    for name, rows in files.items():
        for row in rows:
            assert set(row) == {"prompt", "chosen", "rejected", "domain"}, name
            assert common._DOMAIN_OF[row["prompt"].split(":")[0]] == row["domain"]
            gold = [common.synthetic_gold_reward(row["prompt"], row[k], row["domain"]) for k in ("chosen", "rejected")]
            assert gold[0] > gold[1] and row["chosen"].strip() and row["rejected"].strip(), (name, row)
    for r in ("r1", "r2"):
        samples, demo = files[f"{r}/samples"], files[f"{r}/demo"]
        assert samples and demo[: len(samples)] == samples and len(demo) > len(samples)
        assert all(demos[row["prompt"]] in (row["chosen"], row["rejected"]) for row in demo[len(samples) :])
        assert len(files[f"{r}/mix"]) > len(demo)
    nxt = [json.loads(line) for line in open(tmp_path / "r2" / "next.jsonl")]
    assert nxt == files["r1/demo"] + files["r2/demo"]


def test_rm_scores_reads_a_response_as_ppo_reads_a_rollout(tmp_path):
    """bench/rm_scores.py's score of a hand-written response is dro_ppo.rollout_scores' of the same response sampled
    to its end token (to the two decimals it prints), and differs between responses (the probe reads the text)."""
    from transformers import AutoModelForSequenceClassification

    tok = common.tiny_tokenizer()
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    lifecycle.save_atomically(rm, tok, str(tmp_path / "rm"))
    script = os.path.join(ROOT, "bench", "rm_scores.py")
    proc = subprocess.run(
        [sys.executable, script, str(tmp_path / "rm"), "add: 2+3=5,no!,17"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("add: 2+3: ")
    printed = [float(cell.rsplit(" ", 1)[1]) for cell in line[len("add: 2+3: ") :].split(" / ")]
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    rm.config.pad_token_id = tok.pad_token_id
    ids = [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in ("5", "no!", "17")]
    responses, response_mask = common.pad(ids, tok.pad_token_id)
    with torch.no_grad():
        scores = dro_ppo.rollout_scores(
            tok, rm, ["add: 2+3\n"] * 3, ["reasoning"] * 3, [False] * 3, responses, response_mask, [True] * 3
        )
    assert printed == pytest.approx(scores.tolist(), abs=0.005 + 1e-6)
    assert len(set(printed)) == 3
