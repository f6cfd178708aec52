"""Forget-answer augmentation (Sun & Li 2025, iShumei-Chinchunmei at SemEval-2025 Task 4, §3.1, Fig. 1).

A model that forgets only the full answer still completes a shorter prefix of it, and long answers dominate the
loss. So each forget answer is cut into sentences and two kinds of extra examples are made:

* segments:   same input, output = the answer's first 1, 2, ..., n-1 sentences (the full answer is the original).
* recombine:  input = original input + " " + first k sentences, output = sentence k+1 (for k = 1..n-1).

Splitting rule (``split_sentences``), exactly:

1. A sentence ends after every newline, and after every run of ``. ! ? ; :`` (plus any closing quotes/brackets
   ``" ' ” ’ ) ]`` right after it) that is followed by whitespace or the end of the text. So "3.5", "10:30",
   "example.com" and "a...b" never split.
2. Except: a run that is a single "." does not end a sentence when the word before it (whitespace-delimited,
   opening quotes/brackets removed) is in ``ABBREVIATIONS`` (case-insensitive), is one capital letter (initials:
   "J. R. R. Tolkien"), or is letters joined by dots ("U.S.", "e.g.", "i.e.", "E.J.").
3. Sentence k is the original text between the end of sentence k-1 and its own end, stripped; pieces that are
   only whitespace are dropped. Empty or whitespace-only text gives []; text with no boundary gives [text.strip()].

Segment k (``segment_answer``) is the ORIGINAL answer up to the end of sentence k, stripped: line breaks and
spacing inside the prefix are kept as they were, and the last segment is ``answer.strip()`` (== the answer for
SemEval data, whose outputs have no surrounding whitespace).

Derived ids keep the source id as prefix and repeat its kind tag at the end, ``<id>#seg<k>_<tag>`` and
``<id>#next<k>_<tag>`` (e.g. ``67148749sc1#seg2_sc1``), so ``records.record_kind`` still works and the augmented file
loads with ``records.load_records``. ``source_id`` maps a derived id back to its source id.

    python augment.py --input forget.jsonl --output forget_aug.jsonl [--mode segments|recombine|both]
"""

import json
import os
import re
import sys
from dataclasses import dataclass, field

from artefacts import write_atomic
from cli import InputError, check_choices, parse_config, run_main
from records import Record, load_records

MODES = ("segments", "recombine", "both")

# Words whose "." is not a sentence end. Ambiguous ones that often end a sentence ("etc", "Inc", "No") are left out:
# a wrong split only makes one extra short segment, a missed split merges two sentences.
ABBREVIATIONS = {
    "dr", "mr", "mrs", "ms", "mx", "prof", "sr", "jr", "st", "mt", "ft", "rev", "hon", "gen", "col", "capt", "lt",
    "sgt", "gov", "sen", "rep", "apt", "ave", "vs", "cf", "approx", "fig", "vol", "ph.d",
    "b", "c", "ca",  # "(b. 1941)", "c. 1900", "ca. 1900" in biographies
}

# Candidate end: a run of delimiters with optional closers, then whitespace or end of text; or a newline.
BOUNDARY = re.compile(r"[.!?;:]+[\"'”’)\]]*(?=\s|\Z)|\n")
OPENERS = "\"'“‘(["
DOTTED = re.compile(r"[A-Za-z](?:\.[A-Za-z])+")  # U.S, e.g, i.e, E.J (the final dot is the candidate)
DERIVED = re.compile(r"#(?:seg|next)\d+(?:_(?:sc|qa)\d)?$")


def _is_abbreviation(text, dot_index):
    """True when the '.' at ``dot_index`` closes an abbreviation or initial rather than a sentence."""
    start = dot_index
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:dot_index].lstrip(OPENERS)
    if word.lower() in ABBREVIATIONS:
        return True
    if len(word) == 1 and word.isupper():
        return True
    return DOTTED.fullmatch(word) is not None


def _sentence_ends(text):
    """Offsets in ``text`` just after each sentence (after its delimiter), skipping whitespace-only pieces."""
    ends, previous = [], 0
    for match in BOUNDARY.finditer(text):
        if match.group() != "\n":
            punctuation = match.group().rstrip("\"'”’)]")
            if punctuation == "." and _is_abbreviation(text, match.start()):
                continue
        if text[previous:match.end()].strip():
            ends.append(match.end())
        previous = match.end()
    if text[previous:].strip():
        ends.append(len(text))
    return ends


def split_sentences(text):
    """Sentences of ``text`` by the rule in the module docstring; each is stripped and keeps its delimiter."""
    sentences, previous = [], 0
    for end in _sentence_ends(text):
        sentences.append(text[previous:end].strip())
        previous = end
    return sentences


def segment_answer(answer):
    """Prefixes of the original answer ending at each sentence end, short to long; the last is the whole answer."""
    return [answer[:end].strip() for end in _sentence_ends(answer)]


def _tag(record_id):
    match = re.search(r"(?:sc|qa)\d$", record_id)
    return "_" + match.group() if match else ""


def derived_id(record_id, kind, k):
    """``<id>#seg<k>_<tag>`` / ``<id>#next<k>_<tag>``: source id first, its sc/qa tag last so the kind survives."""
    return f"{record_id}#{kind}{k}{_tag(record_id)}"


def source_id(record_id):
    """The id a derived record came from (``xsc1#seg2_sc1`` -> ``xsc1``); other ids are returned unchanged."""
    return DERIVED.sub("", record_id)


def recombine(record):
    """For k = 1..n-1: input = input + " " + first k sentences of the answer, output = sentence k+1."""
    ends = _sentence_ends(record.output)
    new = []
    for k in range(1, len(ends)):
        prefix = record.output[:ends[k - 1]].strip()
        following = record.output[ends[k - 1]:ends[k]].strip()
        new.append(Record(derived_id(record.id, "next", k), record.input + " " + prefix, following,
                          record.task, record.split))
    return new


def augment_records(records, mode="both"):
    """Originals plus their augmentations, per record: seg1..seg(n-1), the original, next1..next(n-1).

    A record whose answer has n >= 2 sentences yields 1 + (n-1) records for "segments" or "recombine" and
    1 + 2(n-1) for "both"; a record with n <= 1 passes unchanged.
    """
    if mode not in MODES:
        raise InputError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    out = []
    for record in records:
        segments = segment_answer(record.output)
        if len(segments) < 2:
            out.append(record)
            continue
        if mode in ("segments", "both"):
            for k, segment in enumerate(segments[:-1], start=1):
                out.append(Record(derived_id(record.id, "seg", k), record.input, segment, record.task, record.split))
        out.append(record)  # the full answer keeps the original id, so it is not duplicated as seg<n>
        if mode in ("recombine", "both"):
            out.extend(recombine(record))
    # Derived ids are unique by construction; this only trips if a source id already looks derived.
    seen = set()
    for record in out:
        if record.id in seen:
            raise InputError(f"duplicate id {record.id!r} after augmentation (a source id looks like a derived one)")
        seen.add(record.id)
    return out


def write_jsonl(records, path):
    """Write records as JSONL, atomically (artefacts.write_atomic): no half-written output."""
    write_atomic(path, "".join(json.dumps({"id": r.id, "input": r.input, "output": r.output, "task": r.task,
                                           "split": r.split}, ensure_ascii=False) + "\n" for r in records))


@dataclass
class AugmentArguments:
    input: str = field(metadata={"help": "Forget (or any) records file, .jsonl or .parquet, with id/input/output/task."})
    output: str = field(metadata={"help": "Output .jsonl path (fields id, input, output, task, split); must differ "
                                          "from --input. Written atomically."})
    mode: str = field(default="both", metadata={
        "choices": MODES,
        "help": "segments: add answer prefixes; recombine: add (input + prefix -> next sentence); both: add both."})

    def __post_init__(self):
        check_choices(self)


def main(argv=None):
    (args,) = parse_config((AugmentArguments,), argv, description=__doc__)
    if os.path.realpath(args.output) == os.path.realpath(args.input):
        raise InputError(f"--output {args.output}: same file as --input; write the augmented data elsewhere")
    if not args.output.endswith(".jsonl"):
        raise InputError(f"--output {args.output}: must end in .jsonl (the output is JSON lines)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise InputError(f"--output {args.output}: directory does not exist")
    records = load_records(args.input)
    augmented = augment_records(records, args.mode)
    write_jsonl(augmented, args.output)
    print(f"augment: {len(records)} records -> {len(augmented)} (mode {args.mode}) in {args.output}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
