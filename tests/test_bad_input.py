"""Bad input gets one clear error before training starts, naming the file and line/row or the argument: never a
hang, a framework traceback or a silent drop. Runs are under a timeout, so a hang fails the test."""

import json
import os
import subprocess
import sys

import pytest
import tyro

import common
import dro_dpo
import dro_ppo
import dro_reward
import ingest
import lifecycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
GOOD = {"prompt": "copy: abc\n", "chosen": "abc", "rejected": "abd"}


@pytest.fixture(scope="module")
def tok():
    return common.tiny_tokenizer()


def write(path, text: bytes):
    path.write_bytes(text)
    return str(path)


def good_line(**kw):
    return (json.dumps({**GOOD, **kw}) + "\n").encode()


@pytest.mark.parametrize(
    "bad_line,message",
    [
        (b'{"prompt": oops}\n', "line 3: Expecting value"),
        (b'\xff\xfe{"prompt": "x"}\n', "line 3: 'utf-8' codec can't decode"),
        (b"[1, 2]\n", "line 3: a line must be a JSON object, got list"),
        (b"42\n", "line 3: a line must be a JSON object, got int"),
    ],
)
def test_bad_jsonl_line_names_file_and_line_and_can_be_skipped(tmp_path, tok, bad_line, message, capsys):
    path = write(tmp_path / "data.jsonl", good_line() + good_line(chosen="abc!") + bad_line + good_line())
    with pytest.raises(common.DataError) as e:
        ingest.load_preferences(path, "train", tok)
    assert f"{path}, {message}" in str(e.value)
    rows = ingest.load_preferences(path, "train", tok, skip_bad_rows=True)
    assert len(rows) == 3 and "skipped 1 unreadable line" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", b"", "no rows (an empty file?)"),
        ("empty.json", b"[]", "no rows (an empty file?)"),
        ("object.json", b'{"prompt": "x"}', "expected a JSON list of objects, got dict"),
        ("broken.json", b'[{"prompt": "x"},\n oops]', "line 2: invalid JSON"),
        ("numbers.json", b"[1, 2]", "row 0: a row must be an object with prompt/chosen/rejected, got int"),
        ("latin1.json", b'[{"prompt": "\xe9"}]', "not UTF-8 text"),
        ("data.txt", b"hello", "unknown file type '.txt'"),
        ("data.parquet", b"not parquet", "not a readable parquet file"),
    ],
)
def test_unreadable_files_are_one_clear_error(tmp_path, tok, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(common.DataError) as e:
        ingest.load_preferences(path, "train", tok)
    assert str(e.value).startswith(path) and message in str(e.value)


def test_folders_csv_and_capital_extensions_load(tmp_path, tok):
    import shutil

    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "a.jsonl", good_line() + good_line(prompt="copy: xyz\n"))
    write(folder / "b.csv", b'prompt,chosen,rejected,domain\n"copy: q\n",q,r,chat\n')
    shutil.copy(os.path.join(FIX, "plain.parquet"), folder / "c.PARQUET")
    rows = ingest.load_preferences(str(folder), "train", tok)
    assert len(rows) == 2 + 1 + 2 and rows[2]["domain"] == "chat" and rows[2]["prompt"] == "copy: q\n"
    assert ingest.load_preferences(str(folder / "b.csv"), "train", tok)[0]["chosen"] == "q"
    with pytest.raises(common.DataError, match="no such file or folder"):
        ingest.load_preferences(str(tmp_path / "missing.jsonl"), "train", tok)
    (tmp_path / "nodata").mkdir()
    with pytest.raises(common.DataError, match="a folder with no"):
        ingest.load_preferences(str(tmp_path / "nodata"), "train", tok)


def test_a_local_file_has_no_splits(tok):
    with pytest.raises(common.ArgumentError, match="a local file has no splits"):
        ingest.load_preferences(os.path.join(FIX, "plain.parquet"), "test", tok)


def test_missing_model_folder_says_so():
    from types import SimpleNamespace

    for path in ("./no/such/model", "runs/x/model", "/nonexistent"):
        args = SimpleNamespace(model_name_or_path=path, tokenizer_name_or_path=None, trust_remote_code=False)
        with pytest.raises(common.ArgumentError, match=f"--model-name-or-path {path}: no such folder"):
            lifecycle.load_tokenizer(args)
    proc = run("dro_ppo.py", "--reward-model-path", "runs/none/model")
    assert proc.returncode == 2 and "--reward-model-path runs/none/model: no such folder" in proc.stderr


def test_eval_split_names_are_unique_and_synthetic_works():
    named = ingest.eval_sources("x.jsonl", ("a/x.jsonl", "b/x.jsonl", "c/y.jsonl", "synthetic", "org/name:test_prefs"))
    assert named["a/x.jsonl"] == ("a/x.jsonl", None) and named["b/x.jsonl"] == ("b/x.jsonl", None)
    assert named["y"] == ("c/y.jsonl", None) and named["name:test_prefs"] == ("org/name", "test_prefs")
    assert {"validation", "test_id", "test_uniform", "test_minority"} <= named.keys()
    with pytest.raises(common.ArgumentError, match="twice"):
        ingest.eval_sources("x", ("a/x.jsonl", "a/x.jsonl"))


SCRIPT_ARGS = (
    [
        (dro_reward.Args, flag)
        for flag in (
            "--batch-size 0",
            "--batch-size -4",
            "--gradient-accumulation-steps 0",
            "--log-every 0",
            "--eval-batch-size 0",
            "--total-steps 0",
            "--total-steps -3",
            "--eval-every -2",
            "--learning-rate nan",
            "--max-length 0",
        )
    ]
    + [(dro_dpo.Args, flag) for flag in ("--beta 0", "--temperature 0", "--sft-steps -1", "--max-new-tokens 0")]
    + [
        (dro_ppo.Args, flag)
        for flag in (
            "--num-minibatches 0",
            "--batch-size 0",
            "--temperature 0",
            "--total-steps 0",
            "--samples-per-prompt 0",
            "--kl-coef -1",
        )
    ]
)


@pytest.mark.parametrize("args_class,flag", SCRIPT_ARGS)
def test_every_argument_is_checked_at_parse_time(args_class, flag, capsys):
    with pytest.raises(SystemExit) as e:
        tyro.cli(args_class, args=flag.split())
    assert e.value.code == 2 and flag.split()[0] in capsys.readouterr().err


def run(script, *flags, timeout=120):
    cmd = [sys.executable, os.path.join(ROOT, script), *flags]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def test_too_small_datasets_are_an_error_not_a_hang(tmp_path):
    proc = run("dro_dpo.py", "--max-train-rows", "50", "--output-dir", str(tmp_path / "dpo"))
    assert proc.returncode == 2 and "has 50 rows, fewer than one batch of 64" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "dpo")  # nothing written
    one_row = write(tmp_path / "one.jsonl", good_line())
    proc = run("dro_ppo.py", "--dataset", one_row, "--output-dir", str(tmp_path / "ppo"))
    assert proc.returncode == 2 and "has 1 prompts, fewer than one batch of 32" in proc.stderr
    assert not os.path.exists(tmp_path / "ppo")
    flags = ("--max-train-rows", "40", "--batch-size", "8", "--output-dir", str(tmp_path / "sft"))
    proc = run("dro_ppo.py", *flags)  # the prompts fill a rollout batch, not a warm-start batch
    assert proc.returncode == 2 and "40 warm-start sequences, fewer than one --sft-batch-size of 64" in proc.stderr
    assert not os.path.exists(tmp_path / "sft")


def test_user_errors_exit_2_with_the_message_alone(tmp_path):
    bad = write(tmp_path / "bad.jsonl", good_line() + b"{oops\n")
    proc = run("dro_reward.py", "--dataset", bad, "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}, line 2:")
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "out")
