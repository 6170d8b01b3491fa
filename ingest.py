"""Reading preference data: local files and folders, `save_to_disk` folders and hub datasets, in the plain,
conversational, Unified-Feedback, RewardBench and HHH-alignment schemas, every bad row named by file and row.

The run's machinery, not the method: a first reading can skip it. What the scripts get from it is a
`datasets.Dataset` of {prompt, chosen, rejected, domain} strings (`load_preferences`; `chat` marks chat-template
text, `margin` is the row's margin or None), which `common.load_pairs` tokenizes, and the names of the evaluation
splits (`eval_sources`).
"""

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
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_FORMATS:
        raise common.DataError(
            f"{path}: unknown file type {ext or '(none)'!r}; expected one of {', '.join(LOCAL_FORMATS)}"
        )
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
                        raise common.DataError(f"{path}, line {number}: {e}") from None
                    bad += 1
                    continue
                rows.append((f"{path}, line {number}", row))
    else:
        try:
            if ext == ".json":
                with open(path, "rb") as f:
                    table = json.loads(f.read().decode("utf-8"))
                if not isinstance(table, list):
                    raise common.DataError(f"{path}: expected a JSON list of objects, got {type(table).__name__}")
            elif ext == ".csv":
                import csv

                with open(path, newline="", encoding="utf-8") as f:
                    table = list(csv.DictReader(f))
            else:
                import pyarrow.parquet

                table = pyarrow.parquet.read_table(path).to_pylist()
        except UnicodeDecodeError as e:
            raise common.DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise common.DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
        except OSError as e:
            raise common.DataError(f"{path}: cannot be read ({e})") from None
        except Exception as e:  # pyarrow's errors for a file that is not parquet
            raise common.DataError(f"{path}: not a readable {ext[1:]} file ({type(e).__name__}: {e})") from None
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
            files = sorted(os.path.join(source, f) for f in os.listdir(source) if f.lower().endswith(LOCAL_FORMATS))
            if not files:
                raise common.DataError(f"{source}: a folder with no {'/'.join(LOCAL_FORMATS)} file")
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


def to_preference(row: dict, tokenizer, where: str) -> dict:
    """One row of any supported schema -> {prompt, chosen, rejected, domain} as strings, whether they are chat-template
    text (`chat`) and the row's `margin` (None without one)."""
    if {"conv_A", "conv_B", "conv_A_rating", "conv_B_rating"} <= row.keys():  # Unified-Feedback
        a, b = row["conv_A"], row["conv_B"]
        if row["conv_A_rating"] == row["conv_B_rating"]:
            return None  # a tie carries no preference (the paper's code filters these too)
        if a[:-1] != b[:-1]:
            raise common.DataError(f"{where}: conv_A and conv_B do not share the same prompt turns")
        chosen, rejected = (a, b) if row["conv_A_rating"] > row["conv_B_rating"] else (b, a)
        prompt, (c, r), chat = _conversation_to_strings(a[:-1], [chosen[-1:], rejected[-1:]], tokenizer, where)
        return {"prompt": prompt, "chosen": c, "rejected": r, "domain": row.get("source") or "all", "chat": chat}
    if {"input", "targets"} <= row.keys():  # HHH-alignment: the choice labelled 1 is preferred
        choices, labels = row["targets"]["choices"], row["targets"]["labels"]
        if len(choices) != 2 or sorted(labels) != [0, 1]:
            raise common.DataError(f"{where}: expected two choices labelled 1 and 0, got labels {labels}")
        best = labels.index(1)
        prompt, (c, r), chat = _conversation_to_strings(
            [{"role": "user", "content": row["input"]}],
            [[{"role": "assistant", "content": choices[best]}], [{"role": "assistant", "content": choices[1 - best]}]],
            tokenizer,
            where,
        )
        return {"prompt": prompt, "chosen": c, "rejected": r, "domain": row.get("domain") or "hhh", "chat": chat}
    missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
    if missing:
        raise common.DataError(
            f"{where}: missing column(s) {missing}; found {sorted(k for k, v in row.items() if v is not None)}. "
            "Expected prompt/chosen/rejected, Unified-Feedback (conv_A/conv_B/ratings) or HHH (input/targets)"
        )
    domain = _SECTION_OF.get(row.get("subset"), row.get("subset")) or row.get("domain") or "all"
    prompt, chosen, rejected, chat = row.get("prompt"), row["chosen"], row["rejected"], False
    if isinstance(chosen, list):  # conversational; an implicit prompt is the shared leading turns
        if prompt is None:
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt, (chosen, rejected), chat = _conversation_to_strings(prompt, [chosen, rejected], tokenizer, where)
    if not isinstance(prompt, str):
        raise common.DataError(f"{where}: missing or non-string 'prompt' (got {type(prompt).__name__})")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) or not value.strip():
            raise common.DataError(f"{where}: {key!r} must be a non-empty string, got {value!r:.40}")
    margin = row.get("margin")  # TRL's RewardTrainer: -log sigmoid(r_c - r_r - margin)
    if margin is not None and not isinstance(margin, (int, float)):
        raise common.DataError(f"{where}: 'margin' must be a number, got {margin!r:.40}")
    margin = None if margin is None else float(margin)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "domain": str(domain),
        "chat": chat,
        "margin": margin,
    }


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
    rows, skipped = [], 0
    for i, (where, row) in enumerate(raw[:max_rows]):
        try:
            if not isinstance(row, dict):
                raise common.DataError(
                    f"{where}: a row must be an object with prompt/chosen/rejected, got {type(row).__name__}"
                )
            pref = to_preference(row, tokenizer, where)
        except common.DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        if pref is not None:
            rows.append({**pref, "row": i, "where": where})
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
