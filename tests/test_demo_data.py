"""The demo data generator: reproducible, committed output up to date, SemEval-shaped records and MIA files."""

import importlib.util
import os
import re
from collections import defaultdict

import pytest

from cli import InputError
from conftest import ROOT
from records import TASKS, load_documents, load_records, record_kind

DEMO_DIR = os.path.join(ROOT, "data", "demo")
# data/ is not a package, so load the script by path.
_spec = importlib.util.spec_from_file_location("make_demo_data", os.path.join(ROOT, "data", "make_demo_data.py"))
make_demo_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_demo_data)


def read_tree(root):
    """{relative path: bytes} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def fresh_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.write_demo_data(str(out))
    return str(out)


def doc_id(record_id):
    return record_id[:-3]


def test_generation_is_deterministic(fresh_dir, tmp_path):
    make_demo_data.write_demo_data(str(tmp_path))
    assert read_tree(str(tmp_path)) == read_tree(fresh_dir)


def test_other_seed_gives_other_data(fresh_dir, tmp_path):
    make_demo_data.write_demo_data(str(tmp_path), seed=make_demo_data.DEFAULT_SEED + 1)
    assert read_tree(str(tmp_path))["forget.jsonl"] != read_tree(fresh_dir)["forget.jsonl"]


def test_committed_demo_data_is_up_to_date(fresh_dir):
    committed, fresh = read_tree(DEMO_DIR), read_tree(fresh_dir)
    assert sorted(committed) == sorted(fresh)
    for name in fresh:
        assert committed[name] == fresh[name], f"data/demo/{name} is stale: run python data/make_demo_data.py"


def test_records_are_semeval_shaped(fresh_dir):
    forget = load_records(os.path.join(fresh_dir, "forget.jsonl"))
    retain = load_records(os.path.join(fresh_dir, "retain.jsonl"))
    ids = [r.id for r in forget + retain]
    assert len(ids) == len(set(ids))
    assert not {doc_id(r.id) for r in forget} & {doc_id(r.id) for r in retain}
    for split, records in (("forget", forget), ("retain", retain)):
        assert {r.split for r in records} == {split}
        assert {r.task for r in records} == set(TASKS)
        kinds = defaultdict(list)
        for r in records:
            assert r.kind == record_kind(r.id) in ("sc", "qa")
            assert r.input.strip() and r.output.strip()
            kinds[doc_id(r.id)].append(r.id[-3:])
        for r in records:  # every document: one sc1 and qa0..qa<n-1> in order
            suffixes = kinds[doc_id(r.id)]
            assert suffixes[0] == "sc1" and suffixes[1:] == [f"qa{i}" for i in range(len(suffixes) - 1)]
            if r.task == "Task2":
                assert suffixes == ["sc1", "qa0", "qa1", "qa2", "qa3", "qa4"]
            else:
                assert len(suffixes) >= 2
        # Task1 ids carry literal double quotes, like SemEval's
        assert all(r.id.startswith('"') for r in records if r.task == "Task1")


def test_answers_have_the_intended_sizes(fresh_dir):
    for split in ("forget", "retain"):
        records = load_records(os.path.join(fresh_dir, f"{split}.jsonl"))
        sc_sentences = []
        for r in records:
            if r.kind == "qa":
                assert len(r.output.split()) <= 8, r
            else:
                assert len(r.output.split()) <= make_demo_data.MAX_LONG_OUTPUT_WORDS, r
                # sentence ends, not counting Task3 section headings ("\nCareer.\n")
                sc_sentences.append(len(re.findall(r"[.!?](\s|$)", re.sub(r"\n\w+\.\n", " ", r.output))))
        # half short (one sentence), half long (3-5 sentences), so by-length analysis means something
        assert sorted(sc_sentences)[:len(sc_sentences) // 2] == [1] * (len(sc_sentences) // 2)
        assert all(3 <= n <= 5 for n in sorted(sc_sentences)[len(sc_sentences) // 2:]), sc_sentences


def words(text):
    return set(re.findall(r"[\w@.'-]*\w", text))


@pytest.mark.parametrize("docs_per_task", [make_demo_data.DEFAULT_DOCS_PER_TASK, 4])
def test_every_sc_answer_holds_something_only_its_document_has(tmp_path, docs_per_task):
    """Template text shared by forget and retain documents cannot be forgotten in one and kept in the other; each
    sc answer must carry a name, place or number of its own document."""
    make_demo_data.write_demo_data(str(tmp_path), docs_per_task=docs_per_task)
    rows = load_records(str(tmp_path / "forget.jsonl")) + load_records(str(tmp_path / "retain.jsonl"))
    documents = {doc_id(r.id): r.input + " " + r.output for r in rows if r.kind == "sc"}
    documents.update(load_documents(str(tmp_path / "mia" / "nonmember.jsonl")))
    for r in rows:
        if r.kind == "sc":
            elsewhere = set().union(*(words(text) for other, text in documents.items() if other != doc_id(r.id)))
            assert words(r.output) - elsewhere, r.output


def test_task2_answers_match_the_document(fresh_dir):
    records = load_records(os.path.join(fresh_dir, "forget.jsonl"))
    documents = {doc_id(r.id): r.input + " " + r.output for r in records if r.kind == "sc"}
    for r in records:
        if r.task != "Task2" or r.kind != "qa":
            continue
        text = documents[doc_id(r.id)]
        digits = re.sub(r"\D", "", text)
        if r.id.endswith(("qa1", "qa2")):  # SSN and phone: digits only, as in SemEval
            assert r.output.isdigit() and r.output in digits
        elif r.id.endswith("qa0"):
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r.output)
        else:
            assert r.output in text


def test_mia_files(fresh_dir):
    members = load_documents(os.path.join(fresh_dir, "mia", "member.jsonl"))
    nonmembers = load_documents(os.path.join(fresh_dir, "mia", "nonmember.jsonl"))
    assert len(members) == len(nonmembers) > 0
    assert not {i for i, _ in members} & {i for i, _ in nonmembers}
    assert not {d for _, d in members} & {d for _, d in nonmembers}
    forget = load_records(os.path.join(fresh_dir, "forget.jsonl"))
    retain = load_records(os.path.join(fresh_dir, "retain.jsonl"))
    forget_docs = {doc_id(r.id): r.input + " " + r.output for r in forget if r.kind == "sc"}
    assert dict(members) == forget_docs
    seen_ids = {doc_id(r.id) for r in forget + retain}
    assert not {i for i, _ in nonmembers} & seen_ids
    # held-out documents cover the same tasks (one Task1 id per doc is quoted, as in forget)
    assert sum(i.startswith('"') for i, _ in nonmembers) == sum(i.startswith('"') for i, _ in members)


def test_cli(tmp_path, capsys):
    make_demo_data.main(["--output_dir", str(tmp_path), "--docs_per_task", "1", "--seed", "7"])
    forget = load_records(str(tmp_path / "forget.jsonl"))
    assert sorted({r.task for r in forget}) == list(TASKS)
    assert sum(r.kind == "sc" for r in forget) == 3
    assert "forget.jsonl: " in capsys.readouterr().out
    with pytest.raises(InputError, match="docs_per_task"):
        make_demo_data.main(["--output_dir", str(tmp_path), "--docs_per_task", "0"])
