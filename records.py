"""SemEval-2025 Task 4 records: read, validate, tell their kind, and tokenise them the way evaluation does.

A record is one row of ``forget``/``retain`` data with fields ``id, input, output, task`` (``split`` optional).
The id's last characters mark its kind: ``...sc1`` is sentence completion (regurgitation), ``...qa0``..``qa4``
question answering (knowledge). Every script reads data through this module, so the prompt a model is trained on
is tokenised exactly as evaluation tokenises it.
"""

import json
import os
import re
from dataclasses import dataclass, field, fields

from cli import InputError

TASKS = ("Task1", "Task2", "Task3")
DATA_EXTENSIONS = (".jsonl", ".parquet")
MAX_FIELD_CHARS = 100_000  # a 7B run truncates to max_length anyway; longer fields are almost surely broken data


@dataclass(frozen=True)
class Record:
    id: str
    input: str
    output: str
    task: str
    split: str = ""

    @property
    def kind(self):
        return record_kind(self.id)


def record_kind(record_id):
    """'sc' for sentence completion (``...sc<digit>``), 'qa' for question answering (``...qa<digit>``), else None."""
    match = re.search(r"(sc|qa)\d$", record_id)
    return match.group(1) if match else None


@dataclass(frozen=True)
class DatasetSplit:
    """One split of a ``datasets`` dataset: a Hub id, or a local dir written by ``DatasetDict.save_to_disk``.
    Stands where a data file path would (os.fspath gives the dir or id, str() ``NAME[split]``)."""
    name: str
    config: str = ""
    split: str = "forget"

    def __fspath__(self):
        return self.name

    def __str__(self):
        return f"{self.name}[{self.split}]"


def _dataset_rows(source):
    """Yield (row number, row dict) of a DatasetSplit, loaded with datasets.load_from_disk / load_dataset."""
    import datasets

    flag = f"--dataset_name {source.name}"
    if os.path.isdir(source.name):
        try:
            data = datasets.load_from_disk(source.name)
        except (FileNotFoundError, ValueError) as error:
            raise InputError(f"{flag}: not a dataset saved with save_to_disk ({str(error).splitlines()[0][:200]}); "
                             f"save a DatasetDict there, or pass a Hub dataset id") from None
    else:
        try:
            data = datasets.load_dataset(source.name, source.config or None)
        except Exception as error:  # the hub client raises many types; the message is what helps
            raise InputError(f"{flag}: cannot load it from the Hub ({str(error).splitlines()[0][:200]}); without "
                             f"network, save it with save_to_disk where there is one and pass that dir, or set "
                             f"HF_HUB_OFFLINE=1 to use the cache") from None
    if not isinstance(data, datasets.DatasetDict):
        raise InputError(f"{flag}: holds a single Dataset; expected a DatasetDict with a forget and a retain split "
                         f"(DatasetDict({{'forget': ..., 'retain': ...}}).save_to_disk(DIR))")
    if source.split not in data:
        raise InputError(f"{flag}: no split '{source.split}' (it has {', '.join(data)}); set --forget_split / "
                         f"--retain_split to the split names")
    for number, row in enumerate(data[source.split], start=1):
        yield number, row


def _read_rows(path):
    """Yield (line_number, row dict) from a .jsonl or .parquet file (or a DatasetSplit), with one-line errors
    naming file and line."""
    if isinstance(path, DatasetSplit):
        yield from _dataset_rows(path)
        return
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory; give the .jsonl or .parquet file in it")
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found; check the path")
    extension = os.path.splitext(path)[1]
    if extension == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as error:  # pyarrow raises many types for a corrupt file
            raise InputError(f"{path}: cannot read parquet ({str(error).splitlines()[0][:200]}); "
                             f"rewrite it with pandas.DataFrame.to_parquet") from None
        for index, row in enumerate(frame.to_dict(orient="records"), start=1):
            yield index, row
        return
    if extension != ".jsonl":
        raise InputError(f"{path}: unknown extension '{extension}' (use .jsonl or .parquet)")
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{line_number}: not UTF-8 text (re-encode the file as UTF-8)") from None
            if line_number == 1:
                line = line.removeprefix("\ufeff")  # the byte-order mark Windows editors write; still UTF-8
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{line_number}: not valid JSON ({error.msg}); "
                                 f"each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{line_number}: expected a JSON object with id, input, output, task")
            yield line_number, row


def _type_name(value):
    """JSON's name for a value's type (null, number, array, ...), else the Python/numpy one."""
    if value is None or (isinstance(value, float) and value != value):  # pandas reads a missing string as NaN
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def load_records(path):
    """Read and validate a forget/retain file; returns a non-empty list of Record."""
    records, seen = [], {}
    for line_number, row in _read_rows(path):
        where = f"{path}:{line_number}"
        for name in ("id", "input", "output", "task"):
            if name not in row:
                raise InputError(f"{where}: missing field '{name}' (each row needs id, input, output, task)")
            if not isinstance(row[name], str):
                raise InputError(f"{where}: field '{name}' must be a string, got {_type_name(row[name])}; "
                                 f"write it as text (a quoted JSON string)")
            if len(row[name]) > MAX_FIELD_CHARS:
                raise InputError(f"{where}: field '{name}' has {len(row[name])} characters "
                                 f"(limit {MAX_FIELD_CHARS}); split or shorten it")
        if record_kind(row["id"]) is None:
            raise InputError(f"{where}: id {row['id']!r} does not end in sc<digit> or qa<digit>, so its kind "
                             f"(sentence completion or question answering) is unknown")
        if row["task"] not in TASKS:
            raise InputError(f"{where}: unknown task {row['task']!r} (expected one of {', '.join(TASKS)})")
        if row["id"] in seen:
            raise InputError(f"{where}: duplicate id {row['id']!r} (first on line {seen[row['id']]}); "
                             f"ids must be unique")
        seen[row["id"]] = line_number
        split = row.get("split") or ""
        records.append(Record(row["id"], row["input"], row["output"], row["task"], str(split)))
    if not records:
        raise InputError(f"{path}: no records (the file is empty); "
                         f"expected one row per line with id, input, output, task")
    return records


def find_split_file(data_dir, split):
    """``DIR/forget.jsonl`` or ``DIR/forget.parquet`` (the layout SemEval passed to submissions)."""
    for extension in DATA_EXTENSIONS:
        path = os.path.join(data_dir, split + extension)
        if os.path.isfile(path):
            return path
    raise InputError(f"{data_dir}: no {split}.jsonl or {split}.parquet in this directory")


def resolve_data_files(data_dir=None, forget_file=None, retain_file=None, dataset_name="", dataset_config="",
                       forget_split="forget", retain_split="retain"):
    """Explicit files win over ``data_dir`` or ``dataset_name`` (a DatasetSplit each); returns (forget, retain),
    either may be None."""
    if dataset_name:
        if data_dir:
            raise InputError(f"--data_dir {data_dir} and --dataset_name {dataset_name}: give one of them")
        return (forget_file or DatasetSplit(dataset_name, dataset_config, forget_split),
                retain_file or DatasetSplit(dataset_name, dataset_config, retain_split))
    if data_dir and not os.path.isdir(data_dir):
        raise InputError(f"--data_dir {data_dir}: directory not found; check the path")
    if data_dir:
        forget_file = forget_file or find_split_file(data_dir, "forget")
        retain_file = retain_file or find_split_file(data_dir, "retain")
    return forget_file, retain_file


@dataclass
class DataSourceArguments:
    """Where the forget and retain rows come from: the options train.py and evaluate.py share, declared once."""
    data_dir: str = field(default="", metadata={"help": "Dir with forget.{jsonl,parquet} and retain.{jsonl,parquet} "
                                                "(the SemEval layout)."})
    forget_file: str = field(default="", metadata={"help": "Forget set file (.jsonl/.parquet); overrides "
                                                   "--data_dir's."})
    retain_file: str = field(default="", metadata={"help": "Retain set file (.jsonl/.parquet); overrides "
                                                   "--data_dir's."})
    dataset_name: str = field(default="", metadata={
        "help": "Instead of --data_dir: a Hugging Face dataset with forget and retain splits, as a Hub id or a local "
                "dir written by DatasetDict.save_to_disk (rows with id, input, output, task, checked like files)."})
    dataset_config: str = field(default="", metadata={"help": "--dataset_name's configuration name, if it has "
                                                      "several."})
    forget_split: str = field(default="forget", metadata={"help": "--dataset_name's forget split."})
    retain_split: str = field(default="retain", metadata={"help": "--dataset_name's retain split."})

    def data_sources(self):
        """(forget, retain): file paths, or DatasetSplit of --dataset_name; either may be None."""
        return resolve_data_files(self.data_dir, self.forget_file, self.retain_file, self.dataset_name,
                                  self.dataset_config, self.forget_split, self.retain_split)


DATA_OPTIONS = tuple(option.name for option in fields(DataSourceArguments))


def load_documents(path):
    """MIA documents: rows with ``id`` and ``document`` (member.jsonl / nonmember.jsonl)."""
    documents = []
    for line_number, row in _read_rows(path):
        if not isinstance(row.get("document"), str):
            raise InputError(f"{path}:{line_number}: missing or non-string field 'document'")
        documents.append((str(row.get("id", line_number)), row["document"]))
    if not documents:
        raise InputError(f"{path}: no documents (the file is empty)")
    return documents


# --- tokenisation -------------------------------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt):
    """Prompt ids exactly as the official scorer makes them: the raw input, tokenizer defaults, no chat template."""
    return tokenizer(prompt)["input_ids"]


def encode_answer(tokenizer, answer):
    """Answer ids as the continuation of a prompt: one space, then the answer, no special tokens."""
    return tokenizer(" " + answer.lstrip(), add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, prompt, answer, max_length, loss_on="output"):
    """Training example = prompt ids + answer ids + eos; labels -100 on the prompt unless ``loss_on == 'all'``.

    When too long, the prompt loses tokens from its left (after a leading BOS, which is kept); the answer keeps its
    start and, only if the answer alone exceeds ``max_length``, loses its end.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = encode_answer(tokenizer, answer) + [tokenizer.eos_token_id]
    answer_ids = answer_ids[:max_length]
    room = max_length - len(answer_ids)
    if len(prompt_ids) > room:
        keep_bos = bool(prompt_ids) and tokenizer.bos_token_id is not None and prompt_ids[0] == tokenizer.bos_token_id
        head = prompt_ids[:1] if keep_bos and room > 0 else []
        tail_room = room - len(head)
        prompt_ids = head + (prompt_ids[len(prompt_ids) - tail_room:] if tail_room > 0 else [])
    input_ids = prompt_ids + answer_ids
    if loss_on == "all":
        labels = list(input_ids)
    elif loss_on == "output":
        labels = [-100] * len(prompt_ids) + answer_ids
    else:
        raise InputError(f"--loss_on {loss_on}: expected 'output' or 'all'")
    return {"input_ids": input_ids, "labels": labels}
