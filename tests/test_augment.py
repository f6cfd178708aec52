"""augment.py: sentence splitting, answer segments, recombination, record augmentation and the CLI."""

import json
import os
import subprocess
import sys

import pytest

from augment import augment_records, derived_id, recombine, segment_answer, source_id, split_sentences
from cli import InputError
from conftest import ROOT, shared_path
from records import Record, load_records, record_kind

PYTHON = sys.executable


# --- split_sentences ------------------------------------------------------------------------------------------------

def test_abbreviations_do_not_split():
    assert split_sentences("Dr. Smith arrived. He left.") == ["Dr. Smith arrived.", "He left."]
    assert split_sentences("Mr. and Mrs. Lee met Ms. Park on Baker St. today. Bye.") == [
        "Mr. and Mrs. Lee met Ms. Park on Baker St. today.", "Bye."]
    assert split_sentences("Sammy Davis Jr. sang. Fruit, e.g. apples, i.e. food. The U.S. is big.") == [
        "Sammy Davis Jr. sang.", "Fruit, e.g. apples, i.e. food.", "The U.S. is big."]


def test_initials_do_not_split():
    assert split_sentences("J. R. R. Tolkien wrote it. Then he slept.") == [
        "J. R. R. Tolkien wrote it.", "Then he slept."]


def test_decimals_and_times_do_not_split():
    assert split_sentences("It costs 3.5 dollars. Cheap!") == ["It costs 3.5 dollars.", "Cheap!"]
    assert split_sentences("We met at 10:30 sharp. Good.") == ["We met at 10:30 sharp.", "Good."]


def test_newlines_split_and_are_dropped_from_pieces():
    assert split_sentences("Books.\nPoetry collection by Misra:\n\nFirst book") == [
        "Books.", "Poetry collection by Misra:", "First book"]
    assert split_sentences("line one\nline two") == ["line one", "line two"]


def test_semicolons_and_colons_split():
    assert split_sentences("He ran; she walked: slowly. End") == ["He ran;", "she walked:", "slowly.", "End"]


def test_question_and_exclamation_marks_split():
    assert split_sentences("Who is he? Nobody knows! Really?! Yes.") == [
        "Who is he?", "Nobody knows!", "Really?!", "Yes."]


def test_closing_quote_stays_with_its_sentence():
    assert split_sentences('He said "Go." Then left.') == ['He said "Go."', "Then left."]


def test_one_sentence_empty_and_no_final_punctuation():
    assert split_sentences("The city of Deadesius.") == ["The city of Deadesius."]
    assert split_sentences("") == []
    assert split_sentences("  \n ") == []
    assert split_sentences("no delimiters at all") == ["no delimiters at all"]
    assert split_sentences("First one. and then no end") == ["First one.", "and then no end"]


# --- segment_answer / recombine -------------------------------------------------------------------------------------

def test_segments_are_prefixes_of_the_original_text():
    answer = "Dr. Smith arrived.  He left!\nThe end"
    segments = segment_answer(answer)
    assert segments == ["Dr. Smith arrived.", "Dr. Smith arrived.  He left!", answer]
    assert all(answer.startswith(segment) for segment in segments)
    assert segments[-1] == answer


def test_segments_of_short_and_empty_answers():
    assert segment_answer("The city of Deadesius.") == ["The city of Deadesius."]
    assert segment_answer("no delimiters") == ["no delimiters"]
    assert segment_answer("") == []


def test_recombine_pairs():
    record = Record("abcsc1", "Once upon a time", "a fox ran. It was fast! The end", "Task1", "forget")
    assert recombine(record) == [
        Record("abcsc1#next1_sc1", "Once upon a time a fox ran.", "It was fast!", "Task1", "forget"),
        Record("abcsc1#next2_sc1", "Once upon a time a fox ran. It was fast!", "The end", "Task1", "forget"),
    ]
    assert recombine(Record("xqa0", "Q?", "One answer.", "Task2")) == []


# --- augment_records ------------------------------------------------------------------------------------------------

RECORDS = [
    Record("aaasc1", "Story start", "One. Two. Three.", "Task1", "forget"),
    Record("bbbqa0", "Who?", "Dr. Who.", "Task2", "forget"),
    Record("cccqa1", "What?", "A; B", "Task3", "forget"),
]


def test_augment_segments():
    assert augment_records(RECORDS, "segments") == [
        Record("aaasc1#seg1_sc1", "Story start", "One.", "Task1", "forget"),
        Record("aaasc1#seg2_sc1", "Story start", "One. Two.", "Task1", "forget"),
        RECORDS[0],
        RECORDS[1],
        Record("cccqa1#seg1_qa1", "What?", "A;", "Task3", "forget"),
        RECORDS[2],
    ]


def test_augment_recombine():
    assert augment_records(RECORDS, "recombine") == [
        RECORDS[0],
        Record("aaasc1#next1_sc1", "Story start One.", "Two.", "Task1", "forget"),
        Record("aaasc1#next2_sc1", "Story start One. Two.", "Three.", "Task1", "forget"),
        RECORDS[1],
        RECORDS[2],
        Record("cccqa1#next1_qa1", "What? A;", "B", "Task3", "forget"),
    ]


def test_augment_both_count_formula_and_unique_ids():
    augmented = augment_records(RECORDS, "both")
    # n sentences = 3, 1, 2 -> 1 + 2(n-1) each = 5 + 1 + 3
    assert len(augmented) == 9
    ids = [record.id for record in augmented]
    assert len(set(ids)) == len(ids)
    assert [record_kind(i) for i in ids] == ["sc"] * 5 + ["qa"] * 4
    assert [source_id(i) for i in ids] == ["aaasc1"] * 5 + ["bbbqa0"] + ["cccqa1"] * 3


def test_augment_rejects_unknown_mode():
    with pytest.raises(InputError):
        augment_records(RECORDS, "shuffle")


def test_derived_and_source_ids():
    assert derived_id("67148749sc1", "seg", 2) == "67148749sc1#seg2_sc1"
    assert derived_id("noTag", "next", 1) == "noTag#next1"
    assert source_id("67148749sc1#seg2_sc1") == "67148749sc1"
    assert source_id("noTag#next1") == "noTag"
    assert source_id("plain#idqa0") == "plain#idqa0"


# --- CLI ------------------------------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([PYTHON, os.path.join(ROOT, "augment.py"), *args], capture_output=True, text=True,
                          cwd=ROOT)


def write_rows(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": r.id, "input": r.input, "output": r.output, "task": r.task, "split": r.split})
                    + "\n")


def test_cli_round_trip(tmp_path):
    source, target = tmp_path / "forget.jsonl", tmp_path / "aug.jsonl"
    write_rows(source, RECORDS)
    result = run_cli("--input", str(source), "--output", str(target), "--mode", "both")
    assert result.returncode == 0, result.stderr
    assert load_records(str(target)) == augment_records(RECORDS, "both")
    assert sorted(os.listdir(tmp_path)) == ["aug.jsonl", "forget.jsonl"]  # no temp file left behind
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert list(rows[0]) == ["id", "input", "output", "task", "split"]


def test_cli_missing_input_is_one_line_error(tmp_path):
    target = tmp_path / "aug.jsonl"
    result = run_cli("--input", str(tmp_path / "absent.jsonl"), "--output", str(target))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "file not found" in result.stderr
    assert not target.exists()


def test_cli_refuses_output_equal_to_input(tmp_path):
    source = tmp_path / "forget.jsonl"
    write_rows(source, RECORDS)
    before = source.read_bytes()
    result = run_cli("--input", str(source), "--output", str(source))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "same file" in result.stderr
    assert source.read_bytes() == before
    assert os.listdir(tmp_path) == ["forget.jsonl"]


def test_cli_bad_mode_is_one_line_error(tmp_path):
    source, target = tmp_path / "forget.jsonl", tmp_path / "aug.jsonl"
    write_rows(source, RECORDS)
    result = run_cli("--input", str(source), "--output", str(target), "--mode", "shuffle")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--mode" in result.stderr
    assert not target.exists()


# --- real data ------------------------------------------------------------------------------------------------------

def test_real_forget_data_segments():
    records = load_records(shared_path("semeval25", "train", "forget.jsonl"))
    sc_records = [r for r in records if r.kind == "sc"]
    assert sc_records
    for record in sc_records:
        segments = segment_answer(record.output)
        assert len(segments) >= 1, record.id
        assert segments[-1] == record.output, record.id
    augmented = augment_records(records, "both")
    ids = [r.id for r in augmented]
    assert len(set(ids)) == len(ids)
    expected = sum(1 + 2 * (len(split_sentences(r.output)) - 1) if len(split_sentences(r.output)) > 1 else 1
                   for r in records)
    assert len(augmented) == expected
