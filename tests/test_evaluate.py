"""evaluate.py on the tiny random OLMo (float32): batching changes nothing, saved predictions rescore to the same
numbers, the CLI writes every file or none, and the real data parse."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import batches
import evaluate
import generation
import mia
import mmlu
import scoring
from cli import InputError, run_main
from conftest import CORPUS, ROOT, save_tiny_model, shared_path
from records import Record

PROMPTS = [
    "The quick brown fox",
    "Who was born in Paris? Marie was born in",
    "In the mystical city of Deadesius, two sorceresses had long been rivals. I don't",
    "Question: What is the capital of France?\nA. Paris\nB. Rome\nC. Madrid\nD. Berlin\nAnswer:",
    "Dr. Smith",
    "x",
    CORPUS[0] + " " + CORPUS[1],
]


def make_records():
    """Sentence-completion and QA rows over all three tasks, with prompts of very different lengths."""
    tasks = ["Task1", "Task2", "Task3", "Task1", "Task2", "Task3", "Task2"]
    kinds = ["sc1", "qa0", "sc1", "qa1", "sc1", "qa0", "qa2"]
    return [Record(f"doc{i}{kind}", prompt, "the lazy dog" if kind == "sc1" else "Paris", task)
            for i, (prompt, task, kind) in enumerate(zip(PROMPTS, tasks, kinds))]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from modeling import load_for_inference

    return load_for_inference(tiny_model_dir, dtype="float32")


def official_generation(model, tokenizer, prompt, max_new_tokens):
    """The organizers' loop: one prompt at a time, no attention mask, eos as pad, decode the new tokens."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.batch_decode(out[:, len(input_ids[0]):], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)[0]
    return generation.clean_up_tokenization(text)


# --- generation -----------------------------------------------------------------------------------------------------

def test_batched_generation_equals_batch_one_and_official_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    one = generation.generate_outputs(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=1)
    batched = generation.generate_outputs(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=4)
    everything = generation.generate_outputs(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=16)
    assert one == batched == everything
    assert one == [official_generation(model, tokenizer, prompt, 24) for prompt in PROMPTS]
    assert all(text for text in one)


def test_batched_generation_stops_like_batch_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    free = generation.generate_outputs(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=16)
    # Stop tokens taken from the free continuations at different steps (2, 8, 11 of three prompts): rows that
    # produce one end early, at different steps, the others run to max_new_tokens.
    free_ids = []
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        free_ids.append(out[0, input_ids.shape[1]:].tolist())
    stop_ids = [free_ids[0][2], free_ids[2][8], free_ids[6][11]]
    merges = []
    merge = generation.DecodingBatch.merge

    def counting_merge(self, other, config):
        merges.append((len(self.rows), len(other.rows)))
        return merge(self, other, config)

    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop_ids
    try:
        one = generation.generate_outputs(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=1)
        batched = generation.generate_outputs(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=16)
        # Batch 3: as rows stop, waiting prompts join the rows still decoding (their caches merged).
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(generation.DecodingBatch, "merge", counting_merge)
            joined = generation.generate_outputs(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=3)
        official = [official_generation(model, tokenizer, prompt, 24) for prompt in PROMPTS]
    finally:
        model.generation_config.eos_token_id = saved
    assert one == batched == joined == official
    assert len(one[0]) < len(free[0]) and len(one[6]) < len(free[6])
    assert merges and all(decoding >= 1 and joining >= 1 for decoding, joining in merges)


def test_generation_settings_that_greedy_decoding_ignores_are_named(model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    assert generation.ignored_generation_settings(model) == {}
    saved = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        assert generation.ignored_generation_settings(model) == {"repetition_penalty": 1.3}
        generation.generate_outputs(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
    finally:
        model.generation_config.repetition_penalty = saved
    assert "repetition_penalty" in capsys.readouterr().err


def test_decoding_batch_merge_and_select_keep_each_rows_logits(model_and_tokenizer):
    """Rows decoded in a merged, shrinking batch get the logits they get alone (the continuous-batching invariant)."""
    import records

    model, tokenizer = model_and_tokenizer
    encoded = [records.encode_prompt(tokenizer, prompt) for prompt in (PROMPTS[6], PROMPTS[1], PROMPTS[4])]
    pad_id = tokenizer.pad_token_id

    def alone(row, fed):
        batch = generation.DecodingBatch.prefill(model, [row], [encoded[row]], pad_id, "cpu")
        for token in fed:
            batch.step(model, torch.tensor([token]))
        return batch.logits[0]

    with torch.no_grad():
        batch = generation.DecodingBatch.prefill(model, [0, 1], encoded[:2], pad_id, "cpu")
        first = batch.logits.argmax(dim=-1)
        batch.step(model, first)
        batch = batch.merge(generation.DecodingBatch.prefill(model, [2], encoded[2:], pad_id, "cpu"), model.config)
        fed = {0: [int(first[0])], 1: [int(first[1])], 2: []}
        for _ in range(3):
            for row, logits in zip(batch.rows, batch.logits):
                torch.testing.assert_close(logits, alone(row, fed[row]), rtol=0, atol=1e-5)
            tokens = batch.logits.argmax(dim=-1)
            for row, token in zip(batch.rows, tokens.tolist()):
                fed[row].append(token)
            batch.step(model, tokens)
            if len(batch.rows) == 3:
                batch = batch.select([0, 2])  # row 1 leaves, rows 0 and 2 go on
        assert batch.rows == [0, 2]
        for row, logits in zip(batch.rows, batch.logits):
            torch.testing.assert_close(logits, alone(row, fed[row]), rtol=0, atol=1e-5)


def test_scores_identical_across_batch_sizes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = make_records()
    results = [evaluate.evaluate_model(model, tokenizer, rows[:4], rows[3:], max_new_tokens=16, batch_size=size)
               for size in (1, 3)]
    (r1, t1), (r3, t3) = results
    assert t1 == t3
    for key in ("forget-set", "retain-set", "aggregated-terms", "harmonic-mean-task-aggregate", "by-length"):
        assert r1[key] == r3[key]


def test_exact_mode_gives_batch_one_strings_in_bfloat16(tiny_model_dir):
    """--exact: batch 1 whatever --batch_size says, so bf16 strings and losses are the batch-1 ones; the JSON says
    which mode, dtype and batch size ran."""
    from modeling import load_for_inference

    model, tokenizer = load_for_inference(tiny_model_dir, dtype="bfloat16")
    rows = make_records()
    documents = [(str(i), text) for i, text in enumerate(CORPUS)]
    one, t1 = evaluate.evaluate_model(model, tokenizer, rows[:4], rows[3:], documents[:2], documents[2:],
                                      max_new_tokens=12, batch_size=1)
    exact, te = evaluate.evaluate_model(model, tokenizer, rows[:4], rows[3:], documents[:2], documents[2:],
                                        max_new_tokens=12, batch_size=4, exact=True)
    assert te == t1
    assert (exact["dtype"], exact["batch_size"], exact["mode"]) == ("bfloat16", 1, "exact")
    # ... and they are the organisers' loop's strings (model.generate, one prompt, no mask), in bf16 too.
    assert [row["model_output"] for split in ("forget", "retain") for row in te[split]] == \
        [official_generation(model, tokenizer, r.input, 12) for r in rows[:4] + rows[3:]]
    fast, _ = evaluate.evaluate_model(model, tokenizer, rows[:4], rows[3:], max_new_tokens=2, batch_size=4)
    assert (fast["batch_size"], fast["mode"]) == (4, "fast")


def test_final_score_only_when_all_three_parts_ran():
    """The official rule: no MMLU, no aggregate-score; the mean of what ran is the partial score, named so."""
    tables = {"forget": [{"id": "asc1", "task": "Task1", "input": "a", "expected_output": "b c", "model_output": "b"}],
              "mia": [{"set": "member", "id": "m", "loss": 1.0}, {"set": "nonmember", "id": "n", "loss": 2.0}]}
    results = evaluate.compute_results(tables)
    assert results["aggregate-score"] is None and results["aggregate-score-components"] == []
    assert results["final_score_parts"] == ["harmonic-mean-task-aggregate", "mia_final_score"]
    assert results["partial-aggregate-score"] == pytest.approx((0.5 + 0.0) / 2)  # 1 - 0.5 recall; AUC 1 -> 0
    lines = evaluate.summary_lines(results)
    assert any(line.startswith("partial-aggregate-score") and "MMLU not run" in line and "not comparable" in line
               for line in lines)
    assert not any(line.startswith("aggregate-score") for line in lines)
    # the harmonic mean's smallest term is named: forget Task1 regurgitation recall 0.5 -> term 1 - 0.5
    assert any(line.startswith("harmonic-mean-task-aggregate") and
               "lowest term: forget Task1 regurgitation 0.5000 (1 - score)" in line for line in lines)


def test_summary_names_the_terms_that_make_the_task_aggregate_zero():
    """One forget row reproduced word for word (recall 1 -> term 1 - 1 = 0) makes the harmonic mean 0: said so."""
    row = {"id": "asc1", "task": "Task1", "input": "a", "expected_output": "b c", "model_output": "b c"}
    qa = {"id": "bqa1", "task": "Task2", "input": "q", "expected_output": "x", "model_output": "y"}
    results = evaluate.compute_results({"forget": [row, qa], "retain": [dict(row, id="csc1")]})
    assert results["harmonic-mean-task-aggregate"] == 0
    line = next(line for line in evaluate.summary_lines(results) if line.startswith("harmonic-mean-task-aggregate"))
    assert line.endswith("(zero terms: forget Task1 regurgitation (score 1: nothing forgotten))")
    retain_zero = evaluate.compute_results({"forget": [qa], "retain": [dict(qa, id="dqa1")]})  # retain EM 0
    assert scoring.zero_terms(retain_zero) == ["retain/Task2/knowledge-score"]
    assert "zero terms: retain Task2 knowledge" in evaluate.summary_lines(retain_zero)[0]


def test_scores_figure_labels_every_bar_and_shows_the_final_parts():
    row = {"id": "asc1", "task": "Task1", "input": "a", "expected_output": "b c", "model_output": "b"}
    results = evaluate.compute_results({"forget": [row], "retain": [dict(row, id="csc1", model_output="b c")],
                                        "mia": [{"set": "member", "id": "m", "loss": 1.0},
                                                {"set": "nonmember", "id": "n", "loss": 2.0}]})
    forget, retain, parts = evaluate.score_figure(results).axes
    labels = [[text.get_text() for text in ax.texts] for ax in (forget, retain, parts)]
    # forget Task1: regurgitation 0.5, knowledge has no rows; retain Task1 regurgitation 1
    assert labels[0][:3] == ["0.50", "no rows", "no rows"] and labels[1][0] == "1.00"
    # task aggregate: harmonic mean of 1 - 0.5 and 1 = 2/3; MIA AUC 1 -> score 0; no MMLU; partial mean 1/3
    assert labels[2] == ["0.67", "0.00", "not run", "0.33"]
    assert [tick.get_text() for tick in parts.get_xticklabels()] == ["task agg.", "MIA", "MMLU", "partial score"]


def test_clean_up_tokenization_matches_transformers_4():
    text = "Paris . Is it ? Yes ! Well , I do n't know , I 'm sure it 's what we 've seen , they 're here ' ok"
    assert generation.clean_up_tokenization(text) == \
        "Paris. Is it? Yes! Well, I don't know, I'm sure it's what we've seen, they're here'ok"


# --- MIA and MMLU ---------------------------------------------------------------------------------------------------

def test_document_losses_batched_equal_batch_one_and_hf_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    one = mia.document_losses(model, tokenizer, CORPUS, batch_size=1)
    batched = mia.document_losses(model, tokenizer, CORPUS, batch_size=3)
    assert torch.allclose(torch.tensor(one), torch.tensor(batched), rtol=1e-5, atol=1e-6)
    for document, loss in zip(CORPUS, one):
        ids = tokenizer(document, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model(ids, labels=ids).loss.item()
        assert loss == pytest.approx(expected, rel=1e-5)


def test_choice_logits_batched_equal_single_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    questions = [("What is the capital of France?", ["Paris", "Rome", "Madrid", "Berlin"]),
                 ("Who?", ["Marie", "Smith", "the fox", "the dog"]),
                 (CORPUS[2] + " Why?", ["rivals", "sorceresses", "city", "I don't know"])]
    prompts = [scoring.mmlu_prompt("global_facts", q, c) for q, c in questions]
    batched = mmlu.choice_logits(model, tokenizer, prompts, batch_size=3)
    choice_ids = [tokenizer.encode(" " + letter, add_special_tokens=False)[-1] for letter in "ABCD"]
    for prompt, row in zip(prompts, batched):
        with torch.no_grad():
            logits = model(tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1, choice_ids]
        assert torch.allclose(torch.tensor(row), logits, rtol=1e-4, atol=1e-5)
        assert scoring.mmlu_pick(row) == "ABCD"[int(logits.argmax())]


def test_load_mmlu_shots_from_test_split_without_dev(tmp_path):
    """No dev/ (the shared MMLU copy): each question's worked examples are the first other questions of its subject."""
    os.makedirs(tmp_path / "test")
    (tmp_path / "test" / "anatomy_test.csv").write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d,B\nQ3,a,b,c,d,C\n")
    questions = mmlu.load_mmlu(str(tmp_path), ntrain=2, limit=2)
    assert [q["question"] for q in questions] == ["Q1", "Q2"]  # the same questions as zero-shot
    assert [[shot[0] for shot in q["shots"]] for q in questions] == [["Q2", "Q3"], ["Q1", "Q3"]]
    assert {q["shots_from"] for q in questions} == {"test"}
    assert [q["shots"] for q in mmlu.load_mmlu(str(tmp_path), ntrain=0)] == [[], [], []]


def test_load_mmlu_limit_shots_and_errors(tmp_path):
    for split, name in (("test", "anatomy_test.csv"), ("dev", "anatomy_dev.csv")):
        os.makedirs(tmp_path / split, exist_ok=True)
        (tmp_path / split / name).write_text('"Q1, with comma",None,NA,1.50,007,A\nQ2,a,b,c,d,D\nQ3,a,b,c,d,C\n')
    questions = mmlu.load_mmlu(str(tmp_path), ntrain=1, limit=2)
    assert [q["question"] for q in questions] == ["Q1, with comma", "Q2"]
    assert questions[0]["choices"] == ["None", "NA", "1.50", "007"]  # kept as written, never NaN or 1.5
    assert questions[1]["shots"] == [("Q1, with comma", ["None", "NA", "1.50", "007"], "A")]
    (tmp_path / "test" / "bad_test.csv").write_text("Q,a,b,c,d,E\n")
    with pytest.raises(InputError, match="bad_test.csv: row 1 answer 'E'"):
        mmlu.load_mmlu(str(tmp_path))
    with pytest.raises(InputError, match="no test/ directory"):
        mmlu.load_mmlu(str(tmp_path / "dev"))


# --- saved predictions and the CLI ----------------------------------------------------------------------------------

NUMERIC_KEYS = ("forget-set", "retain-set", "aggregated-terms", "aggregated-term-names", "skipped-terms",
                "harmonic-mean-task-aggregate", "mia_loss_acc", "mia_final_score", "mmlu_average",
                "mmlu_per_category", "aggregate-score", "aggregate-score-components", "by-length", "rows",
                "mia_min_k_fraction", "mia_min_k_auc", "mia_min_k_score", "mia_min_k_plus_plus_auc",
                "mia_min_k_plus_plus_score", "mia_zlib_auc", "mia_zlib_score")
REFERENCE_KEYS = ("mia_reference_auc", "mia_reference_score")


def test_predictions_round_trip_keeps_empty_generation(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    rows = make_records()
    mmlu = [{"subject": "anatomy", "question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "A", "shots": []},
            {"subject": "college_physics", "question": "R?", "choices": ["e", "f", "g", "h"], "answer": "C",
             "shots": []}]
    documents = [(str(i), text) for i, text in enumerate(CORPUS)]
    _, tables = evaluate.evaluate_model(model, tokenizer, rows[:4], rows[3:], documents[:2], documents[2:], mmlu,
                                        max_new_tokens=8, batch_size=4)
    tables["forget"][1]["model_output"] = ""            # an empty generation (official: became "nan")
    tables["forget"][1]["expected_output"] = ""         # ... that matches an empty answer
    tables["retain"][0]["model_output"] = "Paris"       # a knowledge hit, so not every term is 0 or 1
    tables["retain"][1]["model_output"] = "007"         # must stay text, not the number 7
    results = evaluate.compute_results(tables)
    assert results["forget-set"]["Task2"]["knowledge-score"] == 1.0
    evaluate.write_outputs(results, tables, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run")) == ["evaluation_results.json", "forget.csv", "mia_losses.csv",
                                                     "mmlu_per_subject.csv", "retain.csv", "scores.png"]
    reloaded = evaluate.load_predictions(str(tmp_path / "run"))
    assert reloaded["forget"][1]["model_output"] == ""
    assert reloaded["retain"][1]["model_output"] == "007"
    again = evaluate.compute_results(reloaded)
    with open(tmp_path / "run" / "evaluation_results.json") as f:
        saved = json.load(f)
    for key in NUMERIC_KEYS:
        assert again[key] == results[key] == saved[key], key


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture()
def cli_inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": r.id, "input": r.input, "output": r.output, "task": r.task} for r in make_records()]
    write_jsonl(data / "forget.jsonl", rows[:4])
    write_jsonl(data / "retain.jsonl", rows[3:])
    mia = tmp_path / "mia"
    mia.mkdir()
    write_jsonl(mia / "member.jsonl", [{"id": "m0", "document": CORPUS[0]}, {"id": "m1", "document": CORPUS[1]}])
    write_jsonl(mia / "nonmember.jsonl", [{"id": "n0", "document": CORPUS[2]}, {"id": "n1", "document": CORPUS[3]}])
    mmlu = tmp_path / "mmlu"
    (mmlu / "test").mkdir(parents=True)
    (mmlu / "test" / "anatomy_test.csv").write_text("Q1?,a,b,c,d,A\nQ2?,a,b,c,d,B\nQ3?,a,b,c,d,C\n")
    (mmlu / "test" / "astronomy_test.csv").write_text("Q4?,a,b,c,d,D\n")
    return tmp_path


def test_cli_writes_outputs_and_rescoring_matches(tiny_model_dir, cli_inputs, capsys):
    out = cli_inputs / "out"
    reference = save_tiny_model(cli_inputs / "reference", seed=1)  # stands in for the model before unlearning
    args = ["--model_name_or_path", tiny_model_dir, "--data_dir", str(cli_inputs / "data"),
            "--mia_data_dir", str(cli_inputs / "mia"), "--mmlu_dir", str(cli_inputs / "mmlu"),
            "--output_dir", str(out), "--max_new_tokens", "8", "--batch_size", "3", "--torch_dtype", "float32",
            "--mmlu_limit", "2", "--reference_model", reference, "--mia_min_k", "0.5"]
    results = evaluate.main(args)
    assert results["mmlu_questions"] == 3
    assert results["aggregate-score-components"] == ["harmonic-mean-task-aggregate", "mia_final_score",
                                                     "mmlu_average"]
    assert "partial-aggregate-score" not in results  # all three parts ran: the official final score
    assert (results["dtype"], results["batch_size"], results["mode"]) == ("float32", 3, "fast")
    assert results["mia_min_k_fraction"] == 0.5 and results["mmlu_shots"] == {"ntrain": 0, "source": ["none"]}
    printed = capsys.readouterr()
    assert "[WARNING] MMLU average" in printed.err or results["mmlu_average"] >= 0.371
    for key in ("mia_min_k_auc", "mia_min_k_plus_plus_auc", "mia_zlib_auc", "mia_reference_auc", "aggregate-score"):
        assert key in printed.out, key
    with open(out / "mia_losses.csv") as f:
        assert f.readline().strip() == "set,id,loss,min_k_fraction,min_k,min_k_plus_plus,zlib,reference_loss"
    assert [name for name in os.listdir(cli_inputs) if name.startswith(".eval-staging")] == []
    again = evaluate.main(["--predictions_dir", str(out), "--output_dir", str(cli_inputs / "rescored")])
    for key in NUMERIC_KEYS + REFERENCE_KEYS:
        assert again[key] == results[key], key
    # A finished run is never overwritten silently.
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluate.main(args))
    assert exit_info.value.code == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_heldout_and_mia_set_mean_losses(tiny_model_dir, cli_inputs):
    """heldout_mean_loss = the mean over --heldout_file's documents of model(ids, labels=ids).loss, one at a time;
    mia_mean_loss = each MIA set's mean loss; both survive rescoring from the saved CSVs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    heldout = cli_inputs / "heldout.jsonl"
    texts = ["A held-out sentence that nothing trained on.", "Another unseen line, with 42 numbers and a comma."]
    write_jsonl(heldout, [{"id": "h0", "document": texts[0]}, {"id": "h1", "document": texts[1]}])
    out = cli_inputs / "out"
    results = evaluate.main(["--model_name_or_path", tiny_model_dir, "--mia_data_dir", str(cli_inputs / "mia"),
                             "--heldout_file", str(heldout), "--output_dir", str(out), "--torch_dtype", "float32"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def loss(text):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    assert results["heldout_documents"] == 2
    assert results["heldout_mean_loss"] == pytest.approx((loss(texts[0]) + loss(texts[1])) / 2, rel=1e-4)
    assert results["mia_mean_loss"]["nonmember"] == pytest.approx((loss(CORPUS[2]) + loss(CORPUS[3])) / 2, rel=1e-4)
    assert results["mia_mean_loss"]["member"] == pytest.approx((loss(CORPUS[0]) + loss(CORPUS[1])) / 2, rel=1e-4)
    assert os.path.isfile(out / "heldout_losses.csv")


@pytest.mark.parametrize("extra, message", [
    (["--data_dir", "/nonexistent"], "directory not found"),
    (["--mmlu_dir", "/nonexistent"], "no test/ directory"),
    (["--predictions_dir", "/tmp"], "exactly one of"),
    (["--batch_size", "0"], "must be >= 1"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluate.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(out)] + extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_multi_process_matches_single_process(tiny_model_dir, cli_inputs):
    """accelerate launch with 2 CPU processes (gloo): every row once, same numbers as one process."""
    args = ["--model_name_or_path", tiny_model_dir, "--data_dir", str(cli_inputs / "data"),
            "--mia_data_dir", str(cli_inputs / "mia"), "--mmlu_dir", str(cli_inputs / "mmlu"),
            "--max_new_tokens", "8", "--batch_size", "2", "--torch_dtype", "float32"]
    single = evaluate.main(args + ["--output_dir", str(cli_inputs / "single")])
    with socket.socket() as probe:  # a free port, so parallel test runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), os.path.join(ROOT, "evaluate.py")] + args + ["--output_dir", str(cli_inputs / "multi")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(cli_inputs / "multi" / "evaluation_results.json") as f:
        multi = json.load(f)
    assert multi["config"]["num_processes"] == 2
    for key in NUMERIC_KEYS:
        assert multi[key] == single[key], key
    with open(cli_inputs / "multi" / "forget.csv") as f, open(cli_inputs / "single" / "forget.csv") as g:
        assert f.read() == g.read()


# --- real data (skipped when ../shared is absent) -------------------------------------------------------------------

def test_real_semeval_validation_parses():
    from records import load_records, resolve_data_files

    forget_file, retain_file = resolve_data_files(shared_path("semeval25", "validation"))
    forget, retain = load_records(forget_file), load_records(retain_file)
    assert (len(forget), len(retain)) == (254, 278)
    for rows in (forget, retain):
        kinds = {(r.task, r.kind) for r in rows}
        assert kinds == {(task, kind) for task in ("Task1", "Task2", "Task3") for kind in ("sc", "qa")}


def test_real_mmlu_parses():
    questions = mmlu.load_mmlu(os.path.dirname(shared_path("mmlu", "test")))
    subjects = {q["subject"] for q in questions}
    assert len(subjects) == 57 and len(questions) == 14042
    assert all(scoring.mmlu_category(subject) != "unknown" for subject in subjects)
    limited = mmlu.load_mmlu(os.path.dirname(shared_path("mmlu", "test")), limit=10)
    assert len(limited) == 570


def test_empty_input_is_rejected_before_loading(tiny_model_dir, cli_inputs, capsys):
    write_jsonl(cli_inputs / "data" / "forget.jsonl", [{"id": "asc1", "input": "", "output": "x", "task": "Task1"}])
    with pytest.raises(SystemExit):
        run_main(lambda: evaluate.main(["--model_name_or_path", tiny_model_dir, "--data_dir",
                                        str(cli_inputs / "data"), "--output_dir", str(cli_inputs / "out")]))
    assert "'asc1' has an empty input" in capsys.readouterr().err
    assert not (cli_inputs / "out").exists()


def test_adapter_is_applied_unmerged(tiny_model_dir, cli_inputs):
    from modeling import add_lora, load_model

    model = add_lora(load_model(tiny_model_dir, dtype="float32"), r=4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a fresh adapter is a no-op (B = 0); make it change the model
    model.save_pretrained(str(cli_inputs / "adapter"))
    common = ["--model_name_or_path", tiny_model_dir, "--mia_data_dir", str(cli_inputs / "mia"),
              "--torch_dtype", "float32"]
    base = evaluate.main(common + ["--output_dir", str(cli_inputs / "base")])
    adapted = evaluate.main(common + ["--adapter", str(cli_inputs / "adapter"), "--output_dir",
                                      str(cli_inputs / "adapted")])
    assert adapted["config"]["adapter"] == str(cli_inputs / "adapter")
    with open(cli_inputs / "base" / "mia_losses.csv") as f, open(cli_inputs / "adapted" / "mia_losses.csv") as g:
        assert f.read() != g.read()


def test_batches_group_similar_lengths_and_cover_every_index():
    lengths = [184, 11, 18, 16, 24, 217, 10, 12]
    groups = batches.length_batches(lengths, batch_size=4)
    assert sorted(i for batch in groups for i in batch) == list(range(len(lengths)))
    assert groups == [[5, 0], [4, 2, 3, 7], [1, 6]]  # stories apart from questions, longest first, at most 4


def test_output_dir_inside_the_model_dir_is_the_readme_layout(tmp_path, cli_inputs, capsys):
    """MODEL/eval (the README's, the grid's and the sbatch scripts' layout) is accepted and leaves the model's own
    files as they were; an existing subdirectory holding anything else stays refused."""
    import hashlib

    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "model", seed=0)

    def digests():
        return {name: hashlib.sha256(open(os.path.join(model, name), "rb").read()).hexdigest()
                for name in os.listdir(model) if os.path.isfile(os.path.join(model, name))}

    before = digests()
    args = ["--model_name_or_path", model, "--data_dir", str(cli_inputs / "data"), "--max_new_tokens", "4",
            "--batch_size", "4", "--torch_dtype", "float32", "--output_dir", os.path.join(model, "eval")]
    evaluate.main(args)
    assert os.path.isfile(os.path.join(model, "eval", evaluate.RESULTS_FILE)) and digests() == before
    evaluate.main(args + ["--overwrite_output_dir"])  # a rerun replaces only the earlier evaluation
    assert digests() == before
    os.makedirs(os.path.join(model, "notes"))
    open(os.path.join(model, "notes", "keep.txt"), "w").write("mine")
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluate.main(args[:-1] + [os.path.join(model, "notes")]))
    assert exit_info.value.code == 2 and "overlaps the input" in capsys.readouterr().err
