"""Faults a hostile user found (the issue's items): each one is refused before anything on disk changes, or named
and skippable, or stopped cleanly. Most checks call the lifecycle in-process on one finished tiny run (a `Run` is
built in-process: its checks run before anything is written); a few need a subprocess (ordering, signals,
torchrun)."""

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import tyro

import common
import dro_dpo
import dro_ppo
import dro_reward
import ingest
import lifecycle
import robust
from common import ArgumentError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FLAGS = "--total-steps 3 --save-every 1 --eval-every 1 --batch-size 16 --max-train-rows 64 --max-eval-rows 8"


def script(name, *flags, timeout=240):
    cmd = [sys.executable, os.path.join(ROOT, name), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny reward-model run with checkpoints at steps 1 and 2 and evaluations at steps 1, 2, 3."""
    out = tmp_path_factory.mktemp("faults") / "A"
    proc = script("dro_reward.py", "--output-dir", str(out), *FLAGS.split())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def copy_of(finished, tmp_path):
    def copy(name="run"):
        shutil.copytree(finished, tmp_path / name)
        return tmp_path / name

    return copy


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """A Run built in-process installs its SIGTERM/SIGINT handlers: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    hook = sys.excepthook
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    sys.excepthook = hook


def new_run(*flags, args_class=dro_reward.Args):
    return lifecycle.Run(tyro.cli(args_class, args=[*FLAGS.split(), *map(str, flags)]))


def snapshot(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(folder)
        for f in files
        if f != ".lock"
    }


# 1, 3: a resume compares its flags with the checkpoint's; --resume-from refuses another run's folder


def test_resume_refuses_every_flag_that_changes_the_result_and_keeps_the_run_id(finished):
    run_id = json.load(open(finished / "args.json"))["run_id"]
    for flags, named in (
        (["--learning-rate", "0.5"], "--learning-rate 0.001 -> 0.5"),
        (["--dro.rho", "1.0"], "--dro.rho 0.5 -> 1.0"),
        (["--dro.kind", "group"], "--dro.kind 'chi2' -> 'group'"),
        (["--batch-size", "32", "--seed", "3"], "--seed 1 -> 3"),
        (["--dataset", "synthetic-groups"], "--dataset 'synthetic' -> 'synthetic-groups'"),
        (["--total-steps", "1"], "--total-steps 1: checkpoint"),
        (["--exp-name", "other"], "--exp-name 'dro_reward'"),
    ):
        with pytest.raises(ArgumentError, match=named.replace("(", r"\(").replace("+", r"\+")):
            new_run("--output-dir", finished, "--resume", *flags)
    run = new_run("--output-dir", finished, "--resume", "--eval-every", "2", "--total-steps", "5", "--log-every", "1")
    assert run.resuming.endswith("step-00000002") and run.args.run_id == run_id


def test_resume_from_refuses_a_folder_that_holds_another_run(finished, copy_of):
    other = copy_of("B")
    json.dump({"run_id": "another"}, open(other / "args.json", "w"))
    before = snapshot(other)
    with pytest.raises(ArgumentError, match="holds another run"):
        new_run("--resume-from", finished / "checkpoints" / "step-00000002", "--output-dir", other)
    assert snapshot(other) == before
    empty = other.parent / "empty"  # an empty folder continues the run
    assert new_run("--resume-from", finished / "checkpoints" / "step-00000002", "--output-dir", empty).resuming


# 2, 12: --overwrite deletes only once everything is checked, never an input


def test_overwrite_refuses_an_input_inside_the_run_it_would_delete(copy_of):
    out = copy_of()
    with pytest.raises(ArgumentError, match="lies inside the previous run"):
        new_run("--overwrite", "--model-name-or-path", out / "model", "--output-dir", out)


def test_a_user_error_after_loading_leaves_the_folder_untouched(copy_of):
    out = copy_of()
    before = snapshot(out)
    flags = ["--overwrite", "--lora-r", "2", "--lora-target-modules", "nope", "--output-dir", str(out)]
    proc = script("dro_reward.py", *FLAGS.split(), *flags)
    assert proc.returncode == 2 and "error: --lora-target-modules: " in proc.stderr
    assert "has no module named nope" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "args_class,flag,message",
    [
        (dro_reward.Args, "--lr-scheduler-type bogus", "--lr-scheduler-type must be one of"),
        (dro_reward.Args, "--seed -1", "--seed must be in"),
        (dro_reward.Args, "--merge-lora", "--merge-lora needs --lora-r"),
        (dro_reward.Args, "--resume --overwrite", "contradict"),
        (dro_ppo.Args, "--gamma 1e6", "--gamma must be in"),
        (dro_ppo.Args, "--lam 1e6", "--lam must be in"),
        (dro_dpo.Args, "--temperature 1e-30", "--temperature must be in"),
        (dro_ppo.Args, "--temperature 1e-30", "--temperature must be in"),
    ],
)
def test_meaningless_flags_are_refused_at_parse_time(args_class, flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        tyro.cli(args_class, args=flag.split())
    assert e.value.code == 2 and message in capsys.readouterr().err.replace("\n", " ").replace("│", "")


def test_environment_and_torchrun_only_flags_are_refused_before_anything(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match="exists and is not a folder"):
        new_run("--output-dir", tmp_path / "file")
    with pytest.raises(ArgumentError, match="is a file, not a folder"):
        new_run("--output-dir", tmp_path / "file" / "sub")
    with pytest.raises(ArgumentError, match="--fsdp shards over the processes of torchrun"):
        new_run("--fsdp", "--output-dir", tmp_path / "fsdp")
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ArgumentError, match="cannot be written"):
            new_run("--output-dir", tmp_path / "ro" / "run")
    message = lifecycle.environment_message(OSError(errno.ENOSPC, "No space left on device", "x/state.pt"))
    assert message.startswith("x/state.pt: No space left on device") and "no space left on the disk" in message
    assert lifecycle._normalised(str(tmp_path) + "/") == str(tmp_path)  # a trailing slash is the same folder


# 6, 7, 14: a damaged checkpoint, metrics.jsonl or COMPLETE is found before anything changes


def test_a_damaged_checkpoint_is_refused_before_metrics_are_cut(copy_of):
    out = copy_of()
    state = out / "checkpoints" / "step-00000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[100:3000] = bytes(2900)  # same size: the size check cannot see it
    state.write_bytes(bytes(data))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ArgumentError, match="cannot be read"):
        new_run("--resume", "--output-dir", out)
    assert (out / "metrics.jsonl").read_text() == before
    (out / "checkpoints" / "step-00000002" / "COMPLETE").write_text('{"step": 2, "fi')
    with pytest.raises(ArgumentError, match="COMPLETE marker cannot be read"):
        new_run("--resume", "--output-dir", out)


def test_a_cut_last_metrics_line_is_dropped_and_a_bad_middle_line_named(copy_of):
    out = copy_of()
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n\n{"step": 3, "spl')
    run = new_run("--resume", "--output-dir", out)  # accepted
    lifecycle.claim_folder(str(out), 2).close()
    kept = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert kept == [json.loads(line) for line in lines if json.loads(line)["step"] <= 2] and run.resuming
    metrics.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(ArgumentError, match=r"metrics.jsonl, line 2: not a metrics line"):
        new_run("--resume", "--output-dir", out)


# 11: a signal before the loop stops cleanly and leaves a folder that a re-run or --resume accepts


def test_sigterm_before_the_first_step_stops_cleanly_and_the_folder_restarts(tmp_path):
    out = tmp_path / "run"
    flags = [*FLAGS.split(), "--sft-steps", "100000", "--output-dir", str(out)]  # a warm start that never ends
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "dro_dpo.py"), *flags], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # the folder is claimed: warm start
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert "stopped by SIGTERM before the first training step" in err
    assert not [f for f in lifecycle.RUN_FILES if (out / f).exists()] and not list(out.glob("events.out*"))
    assert new_run("--resume", "--output-dir", out, args_class=dro_dpo.Args).resuming is None  # starts afresh
    new_run("--output-dir", out, args_class=dro_dpo.Args)  # a plain re-run too


# 5: under torchrun every error is printed once


def test_a_user_error_under_torchrun_is_printed_once(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    cmd = [*launcher, os.path.join(ROOT, "dro_reward.py"), "--batch-size", "7", "--output-dir", str(tmp_path / "r")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("error: --batch-size 7 must be divisible by processes") == 1


# 4, 10: models checked for their role; a saved LoRA adapter is a model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("models")
    tok = common.tiny_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(common.tiny_config(tok)).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    base = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    base.config.pad_token_id = tok.pad_token_id
    base.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    base = AutoModelForSequenceClassification.from_pretrained(root / "rm")  # the adapter records where its base is
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    for p in adapter.parameters():  # a trained adapter and head, not their initialisation
        if p.requires_grad:
            p.data.normal_()
    adapter.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    ids = torch.tensor([tok("copy: abc\nabc")["input_ids"]])
    with torch.no_grad():
        expected = adapter(input_ids=ids).logits
    bpe = AutoTokenizer.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "bpe"))
    other = common.tiny_config(tok, num_labels=1)
    other.vocab_size = max(len(bpe), len(tok)) + 8
    AutoModelForSequenceClassification.from_config(other).save_pretrained(root / "rm_bpe")
    bpe.save_pretrained(root / "rm_bpe")
    return root, tok, ids, expected


def test_a_model_is_checked_for_its_role_and_an_adapter_loads_as_a_model(tiny_models):
    from transformers import AutoModelForSequenceClassification as SeqCls

    root, tok, ids, expected = tiny_models
    args = tyro.cli(dro_ppo.Args, args=[])
    with pytest.raises(ArgumentError, match="score.weight are not in the checkpoint"):
        lifecycle.load_model(SeqCls, str(root / "lm"), args, tok, "--reward-model-path", frozen=True, num_labels=1)
    with pytest.raises(ArgumentError, match="its tokenizer differs from the policy's"):
        lifecycle.load_model(SeqCls, str(root / "rm_bpe"), args, tok, "--reward-model-path", frozen=True, num_labels=1)
    lifecycle.load_model(SeqCls, str(root / "rm") + "/", args, tok, "--reward-model-path", frozen=True, num_labels=1)
    lifecycle.load_model(SeqCls, str(root / "lm"), args, tok, num_labels=1)  # a new head to train: fine
    model = lifecycle.load_model(SeqCls, str(root / "adapter"), args, tok, "--reward-model-path", frozen=True)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    args.model_name_or_path = str(root / "adapter")
    assert lifecycle.load_tokenizer(args).get_vocab() == tok.get_vocab()


# 8, 9: every malformed row named and skippable; no file ignored without a word; nothing relabelled


@pytest.mark.parametrize(
    "row,message",
    [
        ({"chosen": ["hi", "there"], "rejected": ["hi", "you"]}, "'chosen' message 0 must be an object"),
        ({"chosen": [{"content": "a"}], "rejected": [{"role": "user", "content": "b"}]}, "must be an object with"),
        ({"prompt": "a\ud800b", "chosen": "x", "rejected": "y"}, "not valid Unicode"),
        (
            {
                "conv_A": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "conv_B": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
                "conv_A_rating": "5",
                "conv_B_rating": 3,
            },
            "must be numbers",
        ),
        ({"prompt": "p", "chosen": {"x": 1}, "rejected": "y"}, "'chosen' must be a non-empty string"),
    ],
)
def test_a_malformed_row_is_named_and_skippable(tmp_path, row, message):
    tok = common.tiny_tokenizer()
    path = tmp_path / "d.jsonl"
    good = {"prompt": "copy: abc\n", "chosen": "abc", "rejected": "abd"}
    text = json.dumps(good) + "\n" + json.dumps(row) + "\n"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if "\ud800" in text else text.encode())
    with pytest.raises(DataError, match=f"{path}, line 2: .*{message}"):
        ingest.load_preferences(str(path), None, tok)
    assert len(ingest.load_preferences(str(path), None, tok, skip_bad_rows=True)) == 1


def test_ragged_csv_and_a_failing_chat_template_are_bad_rows(tmp_path):
    tok = common.tiny_tokenizer()
    ragged = tmp_path / "r.csv"
    ragged.write_text("prompt,rejected\np,r,extra,more\np,r\n")
    with pytest.raises(DataError, match=r"r.csv, row 0: 4 field\(s\), but the header has 2"):
        ingest.load_preferences(str(ragged), None, tok)
    with pytest.raises(DataError, match="no usable preference rows"):  # both skipped: row 1 lacks chosen too
        ingest.load_preferences(str(ragged), None, tok, skip_bad_rows=True)
    conv = tmp_path / "c.jsonl"
    msgs = lambda text: [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]
    conv.write_text(json.dumps({"chosen": msgs("a"), "rejected": msgs("b")}) + "\n")
    tok.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(DataError, match="line 1: the chat template fails on it .*no system role"):
        ingest.load_preferences(str(conv), None, tok)


def test_no_file_is_skipped_silently_and_nothing_is_relabelled(tmp_path, capsys):
    tok = common.tiny_tokenizer()
    rows = common.synthetic_preferences(8, common.TRAIN_MIXTURE, seed=0)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({**r, "domain": 0}) + "\n" for r in rows[4:]))
    (folder / "notes.txt").write_text("not data")
    data = ingest.load_preferences(str(folder), None, tok)
    assert len(data) == 8 and data["domain"][4:] == ["0"] * 4  # an integer domain 0 is kept, not "all"
    assert "ignored 1 file(s) that are not data: notes.txt" in capsys.readouterr().out
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\np,a,b\np,a,a\n")
    data = ingest.load_preferences(str(bom), None, tok)
    assert data["prompt"] == ["p"]  # the BOM is not part of the first column's name
    assert "dropped 1 row(s) without a preference" in capsys.readouterr().out  # chosen == rejected


# 13: extreme values, non-finite steps


def test_skipped_steps_in_a_row_stop_the_run():
    """With --skip-nonfinite-steps a skipped step leaves the model as it was: every step of a short run skipped, or
    SKIPPED_IN_A_ROW steps in a row of a long one, stop the run (counted in steps, not in the updates of a step)."""
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    run = new_run("--skip-nonfinite-steps")  # 3 steps
    assert not run.update_is_finite(1, nan) and not run.update_is_finite(1, one, nan)  # two updates of step 1
    assert not run.update_is_finite(2, nan)
    with pytest.raises(common.NonFiniteError, match="no step since step 0 had a finite update \\(3 skipped in a row"):
        run.update_is_finite(3, nan)
    run = new_run("--skip-nonfinite-steps", "--total-steps", 30)
    assert run.update_is_finite(1, one) and not run.update_is_finite(2, nan) and run.update_is_finite(3, one)
    for step in range(4, 4 + lifecycle.SKIPPED_IN_A_ROW - 1):
        assert not run.update_is_finite(step, nan)
    with pytest.raises(common.NonFiniteError, match=f"since step 3 .*\\({lifecycle.SKIPPED_IN_A_ROW} skipped"):
        run.update_is_finite(3 + lifecycle.SKIPPED_IN_A_ROW, nan)
    assert run.skipped_steps == lifecycle.SKIPPED_IN_A_ROW + 1


def test_a_nonfinite_loss_is_one_line_that_does_not_blame_the_loss_alone(tmp_path):
    run = new_run()
    with pytest.raises(
        common.NonFiniteError, match="step 2: the training loss is nan, from a value upstream that is not finite"
    ):
        run.stop_on_nonfinite_loss(torch.tensor(float("nan")), 2)
    flags = [*FLAGS.split(), "--learning-rate", "1e9", "--output-dir"]
    proc = script("dro_reward.py", *flags, str(tmp_path / "collapsed"))  # evaluated after every step
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        "error: step 2, validation: every reward is exactly 0.0" in proc.stderr
        and "learning rate so high" in proc.stderr
    )
    flags[flags.index("--eval-every") + 1] = "0"
    proc = script("dro_reward.py", *flags, str(tmp_path / "nan"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: step 3: the gradient norm is nan. Stopping; earlier checkpoints are kept" in proc.stderr
    assert not (tmp_path / "nan" / "model").exists() and (tmp_path / "nan" / "checkpoints" / "step-00000002").exists()


def test_group_weights_stay_finite_for_any_finite_step():
    """The exponentiated-gradient update in log space: exp(step * loss) alone overflows (inf / inf = NaN) from
    step * loss > 709; a batch whose losses are not finite has NaN weights (its step stops or is skipped) and leaves
    the domain weights as they were."""
    names = ["a", "b", "c"]
    for step in (0.0, 0.3, 1e3, 1e6, 1e300, 1.7e308):
        groups = robust.GroupWeights(list(names), torch.full((3,), 1 / 3, dtype=torch.float64))
        for losses in ([0.7, 0.69, 0.0], [0.5, 2.0, 1e-3], [1e30, 0.0, 5.0]):
            groups.update(torch.tensor(losses, dtype=torch.float64), step)
            assert torch.isfinite(groups.weights).all() and abs(groups.weights.sum().item() - 1) < 1e-12, step
    groups = robust.GroupWeights(list(names), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    groups.update(torch.tensor([0.5, 2.0, 1e-3], dtype=torch.float64), 1e6)
    assert groups.weights.tolist() == [0.0, 1.0, 0.0]  # the worst domain takes all, as the limit of the product
    groups.update(torch.tensor([0.5, float("nan"), 1.0], dtype=torch.float64), 1.0)
    assert groups.weights.tolist() == [0.0, 1.0, 0.0]
    dro = robust.DROArgs("group", 0.0, 1e6)
    w, _ = robust.robust_prompt_weights(
        torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]), dro, groups, ["a", "b"]
    )
    assert w.isnan().all() and groups.weights.tolist() == [0.0, 1.0, 0.0]
    w, _ = robust.robust_prompt_weights(torch.tensor([1.0, float("inf")]), torch.tensor([0, 1]), robust.DROArgs())
    assert w.isnan().all()  # (robust_weights itself refuses them)


def test_an_extreme_group_step_trains(tmp_path):
    out = tmp_path / "run"
    proc = script(
        "dro_reward.py", "--dro.kind", "group", "--dro.group-step", "1e6", "--output-dir", str(out), *FLAGS.split()
    )
    assert proc.returncode == 0 and (out / "model").exists(), proc.stderr[-2000:]


# 14: the console's table says which mean is metrics.jsonl's


def test_the_console_table_prints_metrics_accuracy_labelled_apart_from_the_domain_mean(capsys):
    report = common.domain_report([1, 1, 1, 0], ["a", "a", "a", "b"])  # 75% of rows, domains 100% and 0%
    common.print_table({"test": report})
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[-5:] == ["domain", "mean", "all", "rows", "worst"]
    assert line.split() == ["test", "100.0", "0.0", "50.0", "75.0", "0.0"] and report["accuracy"] == 0.75
