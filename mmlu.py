"""MMLU as the reference harness (Hendrycks et al.) scores it: the CSVs, the prompts with worked examples, and the
logits of the four choice letters; the arithmetic is scoring.py's."""

import csv
import glob
import os
import sys

import torch

import records
import scoring
from batches import map_length_batches, pad_batch
from cli import InputError

MMLU_MAX_PROMPT_TOKENS = 2048  # the reference harness drops worked examples until the prompt fits


def _read_mmlu_csv(path):
    """Rows (question, [A, B, C, D], answer) of a headerless Hendrycks CSV, strings kept exactly as written."""
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for line_number, row in enumerate(csv.reader(f), start=1):
                if len(row) != 6:
                    raise InputError(f"{path}: row {line_number} has {len(row)} fields "
                                     f"(expected question,A,B,C,D,answer)")
                if row[5].strip() not in scoring.MMLU_CHOICES:
                    raise InputError(f"{path}: row {line_number} answer {row[5]!r} is not A, B, C or D")
                rows.append((row[0], row[1:5], row[5].strip()))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    return rows


def load_mmlu(mmlu_dir, ntrain=0, limit=0):
    """MMLU questions as dicts {subject, question, choices, answer, shots}, subjects in name order."""
    test_dir = os.path.join(mmlu_dir, "test")
    if not os.path.isdir(test_dir):
        raise InputError(f"--mmlu_dir {mmlu_dir}: no test/ directory (expected test/<subject>_test.csv)")
    paths = sorted(glob.glob(os.path.join(test_dir, "*_test.csv")))
    if not paths:
        raise InputError(f"--mmlu_dir {mmlu_dir}: no <subject>_test.csv files in test/")
    questions = []
    from_test = []
    for path in paths:
        subject = os.path.basename(path)[:-len("_test.csv")]
        rows = _read_mmlu_csv(path)
        dev_path = os.path.join(mmlu_dir, "dev", f"{subject}_dev.csv")
        dev_shots = _read_mmlu_csv(dev_path)[:ntrain] if ntrain and os.path.isfile(dev_path) else None
        if ntrain and dev_shots is None:
            from_test.append(subject)
        for index, (question, choices, answer) in enumerate(rows[:limit] if limit else rows):
            if not ntrain:
                shots, shots_from = [], "none"
            elif dev_shots is not None:
                shots, shots_from = dev_shots, "dev"  # the reference harness: the subject's first ntrain dev rows
            else:
                # No dev split (the shared copy has test/ only): the first ntrain *other* questions of the subject,
                # so no question is shown its own answer, and the scored questions are the same as at 0 shots.
                shots, shots_from = [row for j, row in enumerate(rows) if j != index][:ntrain], "test"
            questions.append({"subject": subject, "question": question, "choices": choices, "answer": answer,
                              "shots": shots, "shots_from": shots_from})
    if from_test:
        print(f"[WARNING] --mmlu_ntrain {ntrain}: no dev/<subject>_dev.csv for {len(from_test)} subject(s) "
              f"({from_test[0]}, ...); their worked examples are the first {ntrain} other questions of the test "
              f"CSV (the reference harness takes them from dev/)", file=sys.stderr)
    return questions


def mmlu_prompts(tokenizer, questions):
    """Prompts for the questions, with as many worked examples as fit in 2048 tokens (as the reference harness)."""
    prompts = []
    for q in questions:
        k = len(q["shots"])
        prompt = scoring.mmlu_prompt(q["subject"], q["question"], q["choices"], q["shots"][:k])
        while k > 0 and len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > MMLU_MAX_PROMPT_TOKENS:
            k -= 1
            prompt = scoring.mmlu_prompt(q["subject"], q["question"], q["choices"], q["shots"][:k])
        prompts.append(prompt)
    return prompts


def choice_logits(model, tokenizer, prompts, batch_size=16, show_progress=False):
    """Next-token logits of " A".." D" after each prompt (left-padded batches, positions counted from the first
    real token, so padding changes nothing)."""
    choice_ids = scoring.mmlu_choice_token_ids(tokenizer)
    encoded = [records.encode_prompt(tokenizer, prompt) for prompt in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device

    def run_batch(batch):
        padded = pad_batch([{"input_ids": encoded[i]} for i in batch], pad_id, padding_side="left")
        attention_mask = padded["attention_mask"].to(device)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=padded["input_ids"].to(device), attention_mask=attention_mask,
                           position_ids=position_ids, logits_to_keep=1).logits[:, -1, :]
        return logits[:, choice_ids].float().tolist()

    return map_length_batches(encoded, batch_size, run_batch, "mmlu", show_progress)


def mmlu_subject_rows(questions, predictions):
    """Per-subject {subject, category, n, correct, accuracy} in subject order."""
    counts = {}
    for q, predicted in zip(questions, predictions):
        entry = counts.setdefault(q["subject"], [0, 0])
        entry[0] += int(predicted == q["answer"])
        entry[1] += 1
    return [{"subject": s, "category": scoring.mmlu_category(s), "n": n, "correct": c, "accuracy": c / n}
            for s, (c, n) in counts.items()]
