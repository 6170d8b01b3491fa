"""Reading preference data: local files and folders, `save_to_disk` folders and hub datasets, in the plain,
conversational, Unified-Feedback, RewardBench and HHH-alignment schemas, every bad row named by file and row.

The run's machinery, not the method: a first reading can skip it. What the scripts get from it is a
`datasets.Dataset` of {prompt, chosen, rejected, domain} strings (`load_preferences`; `chat` marks chat-template
text, `margin` is the row's margin or None), which `common.load_pairs` tokenizes, and the names of the evaluation
splits (`eval_sources`).
"""

import contextlib
import gzip
import json
import os
from typing import Optional

import common

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
    project so that every problem is a common.DataError naming the file and the line or row: [(where, row), ...]."""
    compressed = path.lower().endswith(".gz")
    ext = os.path.splitext(path[: -len(".gz")] if compressed else path)[1].lower()
    if ext not in LOCAL_FORMATS or (compressed and ext == ".parquet"):
        raise common.DataError(
            f"{path}: unknown file type {ext or '(none)'!r}; expected one of {', '.join(LOCAL_FORMATS)}"
        )
    rows, bad = [], 0
    opener = gzip.open if compressed else open
    if ext == ".jsonl":
        with _named_read_errors(path), opener(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
                    if not isinstance(row, dict):
                        raise ValueError(f"a line must be a JSON object, got {type(row).__name__}")
                except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
                    if not skip_bad_rows:
                        raise common.DataError(f"{path}, line {number}: {e}") from None
                    bad += 1
                    continue
                rows.append((f"{path}, line {number}", row))
    else:
        try:
            if ext == ".json":
                with opener(path, "rb") as f:
                    table = json.loads(f.read().decode("utf-8-sig"))
                if not isinstance(table, list):
                    raise common.DataError(f"{path}: expected a JSON list of objects, got {type(table).__name__}")
            elif ext == ".csv":
                import csv

                with opener(path, "rt", newline="", encoding="utf-8-sig") as f:  # -sig: without a BOM's bytes
                    table = list(csv.DictReader(f))
            else:
                import pyarrow.parquet

                table = pyarrow.parquet.read_table(path).to_pylist()
        except common.DataError:
            raise
        except UnicodeDecodeError as e:
            raise common.DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise common.DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
        except OSError as e:
            raise common.DataError(f"{path}: cannot be read ({e})") from None
        except Exception as e:  # pyarrow's errors for a file that is not parquet
            raise common.DataError(f"{path}: not a readable {ext[1:]} file ({type(e).__name__}: {e})") from None
        rows = [(f"{path}, row {i}", row) for i, row in enumerate(table)]
        if ext == ".csv":  # a row with more or fewer fields than the header: named (and skipped) like any bad row
            rows = [(where, _ragged_csv_row(row, where)) for where, row in rows]
    if bad:
        print(f"{path}: skipped {bad} unreadable line(s) (--skip-bad-rows)")
    return rows


@contextlib.contextmanager
def _named_read_errors(path: str):
    """A file that cannot be read (or a .gz that is not gzip) as one DataError naming it."""
    try:
        yield
    except (OSError, EOFError) as e:
        raise common.DataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _ragged_csv_row(row: dict, where: str):
    """csv.DictReader puts the extra fields of a row under the key None and the missing ones as None: such a row is
    replaced by an error that load_preferences raises (or skips) as it does for every other bad row."""
    if None in row or None in row.values():
        fields = len(row) - (None in row) + len(row.get(None) or []) - sum(v is None for v in row.values())
        return common.DataError(f"{where}: {fields} field(s), but the header has {len(row) - (None in row)}")
    return row


def load_raw(source: str, split: Optional[str], skip_bad_rows: bool = False):
    """The rows of a source in its own schema, as [(where, row), ...] (`where` names the source and the row or line
    for error messages): a local file or folder of files, a folder saved by `datasets`, or a hub dataset."""
    import datasets

    if _is_local(source):
        if split not in (None, "train"):
            raise common.ArgumentError(
                f"{source}: a local file has no splits (got split {split!r}); "
                f"--dataset-split and ':split' apply to hub datasets and the synthetic task"
            )
        if not os.path.exists(source):
            raise common.DataError(f"{source}: no such file or folder")
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")):
            raise common.DataError(f"{source}: a DatasetDict folder; pass one of its split folders")
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "state.json")):  # Dataset.save_to_disk
            return [(f"{source}, row {i}", row) for i, row in enumerate(datasets.load_from_disk(source))]
        if os.path.isdir(source):
            names = sorted(f for f in os.listdir(source) if os.path.isfile(os.path.join(source, f)))
            readable = LOCAL_FORMATS + tuple(e + ".gz" for e in LOCAL_FORMATS if e != ".parquet")
            files = [os.path.join(source, f) for f in names if f.lower().endswith(readable)]
            ignored = [f for f in names if not f.lower().endswith(readable) and not f.startswith(".")]
            if ignored:
                print(f"{source}: ignored {len(ignored)} file(s) that are not data: {', '.join(ignored[:5])}")
            if not files:
                raise common.DataError(f"{source}: a folder with no {'/'.join(readable)} file")
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
        raise common.DataError(
            f"{source}: could not load it as a hub dataset ({type(e).__name__}: {str(e)[:300]})"
        ) from None
    return [(f"{source}, row {i}", row) for i, row in enumerate(raw)]


def render(messages, tokenizer, add_generation_prompt: bool) -> str:
    """A conversation as text: the tokenizer's chat template, or plain `role: content` lines without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def turn_end(tokenizer) -> str:
    """What the chat template writes after an assistant message's content (e.g. "<|im_end|>\n")."""
    marker, user = "\x00response\x00", [{"role": "user", "content": "hi"}]
    return render(user + [{"role": "assistant", "content": marker}], tokenizer, False).rpartition(marker)[2]


def _conversation_to_strings(prompt_msgs, responses, tokenizer, where):
    """Render the prompt messages (with the generation prompt) and the whole conversation of each response; the
    responses are the rest of each conversation, so that prompt + response is the text the template renders. A
    template that renders the prompt differently when a response follows (e.g. a thinking block) makes the prompt
    what the conversations share with it. Returns the prompt, the responses and whether the text is the template's."""
    for response in responses:
        if not isinstance(response, list) or not response or not isinstance(response[-1], dict):
            raise common.DataError(
                f"{where}: a response must be a non-empty list of messages, got {type(response).__name__}"
            )
        content = response[-1].get("content")
        if not isinstance(content, str) or not content.strip():
            raise common.DataError(f"{where}: empty or non-string final message")
    prompt = render(prompt_msgs, tokenizer, add_generation_prompt=True)
    fulls = [render(list(prompt_msgs) + list(r), tokenizer, add_generation_prompt=False) for r in responses]
    prompt = prompt[: min(len(os.path.commonprefix([prompt, full])) for full in fulls)]
    return prompt, [full[len(prompt) :] for full in fulls], bool(getattr(tokenizer, "chat_template", None))


def _check_messages(messages, where: str, key: str):
    """A conversation must be a list of {"role": str, "content": str} messages."""
    if not isinstance(messages, list):
        raise common.DataError(
            f"{where}: {key!r} must be a string or a list of messages, got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise common.DataError(
                f"{where}: {key!r} message {i} must be an object with string 'role' and 'content', got {m!r:.60}"
            )


def _check_text(value, where: str):
    """Every string of a row must be valid Unicode (a lone surrogate such as "\\ud800" cannot be tokenized)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise common.DataError(f"{where}: text that is not valid Unicode ({e.reason} at {e.start})") from None
    elif isinstance(value, dict):
        for v in value.values():
            _check_text(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where)


def _domain(*candidates) -> str:
    """The first domain that is set (0 and False are values, not "unset"), as a string; "all" if none is."""
    return next((str(c) for c in candidates if c is not None and c != ""), "all")


def _rendered(prompt_msgs, responses, tokenizer, where):
    """_conversation_to_strings, with a chat template that fails on the row named as a bad row."""
    try:
        return _conversation_to_strings(prompt_msgs, responses, tokenizer, where)
    except common.DataError:
        raise
    except Exception as e:  # jinja's TemplateError (raise_exception in the template), a KeyError, ...
        raise common.DataError(f"{where}: the chat template fails on it ({type(e).__name__}: {str(e)[:200]})") from None


def to_preference(row: dict, tokenizer, where: str) -> dict:
    """One row of any supported schema -> {prompt, chosen, rejected, domain} as strings, whether they are chat-template
    text (`chat`) and the row's `margin` (None without one); None for a row that carries no preference (a tie or
    identical responses). A malformed row is a common.DataError naming it."""
    _check_text(row, where)
    if {"conv_A", "conv_B", "conv_A_rating", "conv_B_rating"} <= row.keys():  # Unified-Feedback
        a, b = row["conv_A"], row["conv_B"]
        _check_messages(a, where, "conv_A"), _check_messages(b, where, "conv_B")
        ratings = row["conv_A_rating"], row["conv_B_rating"]
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r == r for r in ratings):
            raise common.DataError(f"{where}: conv_A_rating and conv_B_rating must be numbers, got {ratings!r:.60}")
        if not a or not b:
            raise common.DataError(f"{where}: conv_A and conv_B must not be empty")
        if ratings[0] == ratings[1]:
            return None  # a tie carries no preference (the paper's code filters these too)
        if a[:-1] != b[:-1]:
            raise common.DataError(f"{where}: conv_A and conv_B do not share the same prompt turns")
        chosen, rejected = (a, b) if ratings[0] > ratings[1] else (b, a)
        prompt, (c, r), chat = _rendered(a[:-1], [chosen[-1:], rejected[-1:]], tokenizer, where)
        return _preference(prompt, c, r, _domain(row.get("source")), chat)
    if {"input", "targets"} <= row.keys():  # HHH-alignment: the choice labelled 1 is preferred
        targets = row["targets"]
        if not isinstance(targets, dict) or not isinstance(row["input"], str):
            raise common.DataError(f"{where}: expected a string 'input' and 'targets' with choices and labels")
        choices, labels = targets.get("choices"), targets.get("labels")
        if not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != 2:
            raise common.DataError(f"{where}: expected two choices labelled 1 and 0, got {targets!r:.80}")
        if sorted(labels) != [0, 1] or not all(isinstance(c, str) for c in choices):
            raise common.DataError(f"{where}: expected two choices labelled 1 and 0, got labels {labels}")
        best = labels.index(1)
        prompt, (c, r), chat = _rendered(
            [{"role": "user", "content": row["input"]}],
            [[{"role": "assistant", "content": choices[best]}], [{"role": "assistant", "content": choices[1 - best]}]],
            tokenizer,
            where,
        )
        return _preference(prompt, c, r, _domain(row.get("domain"), "hhh"), chat)
    missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
    if missing:
        found = sorted(str(k) for k, v in row.items() if v is not None)
        raise common.DataError(
            f"{where}: missing column(s) {missing}; found {found}. "
            "Expected prompt/chosen/rejected, Unified-Feedback (conv_A/conv_B/ratings) or HHH (input/targets)"
        )
    domain = _domain(_SECTION_OF.get(row.get("subset"), row.get("subset")), row.get("domain"))
    prompt, chosen, rejected, chat = row.get("prompt"), row["chosen"], row["rejected"], False
    if isinstance(chosen, list) or isinstance(rejected, list):  # conversational; an implicit prompt: leading turns
        _check_messages(chosen, where, "chosen"), _check_messages(rejected, where, "rejected")
        if prompt is None:
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        _check_messages(prompt, where, "prompt")
        prompt, (chosen, rejected), chat = _rendered(prompt, [chosen, rejected], tokenizer, where)
    if not isinstance(prompt, str):
        raise common.DataError(f"{where}: missing or non-string 'prompt' (got {type(prompt).__name__})")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) or not value.strip():
            raise common.DataError(f"{where}: {key!r} must be a non-empty string, got {value!r:.40}")
    margin = row.get("margin")  # TRL's RewardTrainer: -log sigmoid(r_c - r_r - margin)
    if margin is not None and (not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin != margin):
        raise common.DataError(f"{where}: 'margin' must be a number, got {margin!r:.40}")
    return _preference(prompt, chosen, rejected, domain, chat, None if margin is None else float(margin))


def _preference(prompt, chosen, rejected, domain, chat=False, margin=None) -> Optional[dict]:
    """The row, or None when both responses are the same text (no preference: counted, like ties)."""
    if chosen == rejected:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "domain": domain, "chat": chat, "margin": margin}


def load_preferences(
    source: str, split: Optional[str], tokenizer, skip_bad_rows: bool = False, max_rows: Optional[int] = None
):
    """Preference rows {prompt, chosen, rejected, domain, chat, margin, row, where} as a `datasets.Dataset` (`row`:
    the index in the source, `where`: the source and row or line, for error messages).

    `source` is "synthetic" or "synthetic-groups" (the embedded datasets, with their splits), a hub name, or a local
    file or folder. A bad row raises a common.DataError naming the source and the row, or, with `skip_bad_rows`, is
    skipped and counted.
    """
    import datasets

    if source in common.EMBEDDED:
        splits, make_rows = common.EMBEDDED[source]
        if split not in splits:
            raise common.DataError(f"{source} has splits {list(splits)}, not {split!r}")
        mixture, n, offset = splits[split]
        raw = [(f"{source} {split}, row {i}", row) for i, row in enumerate(make_rows(n, mixture, seed=1000 + offset))]
    else:
        raw = load_raw(source, split, skip_bad_rows)
    if not raw:
        raise common.DataError(f"{source}: no rows (an empty file?)")
    rows, skipped, no_preference = [], 0, 0
    for i, (where, row) in enumerate(raw[:max_rows]):
        try:
            if isinstance(row, common.DataError):  # found while reading (a ragged CSV row)
                raise row
            if not isinstance(row, dict):
                raise common.DataError(
                    f"{where}: a row must be an object with prompt/chosen/rejected, got {type(row).__name__}"
                )
            try:
                pref = to_preference(row, tokenizer, where)
            except (TypeError, KeyError, AttributeError, IndexError) as e:  # a shape no check above foresaw
                raise common.DataError(f"{where}: not a preference row ({type(e).__name__}: {str(e)[:200]})") from None
        except common.DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        if pref is not None:
            rows.append({**pref, "row": i, "where": where})
        else:
            no_preference += 1
    if no_preference:
        print(f"{source}: dropped {no_preference} row(s) without a preference (tied ratings or identical responses)")
    if skipped:
        print(f"{source}: skipped {skipped} bad row(s) of {len(raw[:max_rows])} (--skip-bad-rows)")
    if not rows:
        raise common.DataError(f"{source}: no usable preference rows")
    return datasets.Dataset.from_list(rows)


def eval_sources(dataset: str, eval_datasets) -> dict:
    """Evaluation splits by a unique name -> (source, split): each of --eval-datasets (an embedded dataset's name for
    its held-out splits, a hub name with an optional ":split", a local file or folder), or by default the embedded
    dataset's held-out splits when training on one. Two sources with the same short name keep their full one."""
    if not eval_datasets:
        eval_datasets = (dataset,) if dataset in common.EMBEDDED else ()
    sources, several = [], sum(name in common.EMBEDDED for name in eval_datasets) > 1
    for name in eval_datasets:
        if name in common.EMBEDDED:  # split names as they are, or prefixed by the dataset's when several are evaluated
            sources += [(f"{name}:{s}" if several else s, name, s) for s in common.EMBEDDED[name][0] if s != "train"]
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
            raise common.ArgumentError(f"--eval-datasets names {name!r} twice")
        named[name] = (source, split)
    return named
