"""train.py: one optimizer step, calibrated forgetting, AILS-NTUA's chunked schedule, and best-checkpoint selection."""

import math
import os
import re
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import make_unlearning_data, reset_accelerate, write_jsonl
from objectives import answer_nll, per_sequence_nll
from test_train import launch


# --- optimizer_step -------------------------------------------------------------------------------------------------

class TwoParameters(torch.nn.Module):
    """y = w * x + b: two scalar weights, small enough to compute AdamW by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.b = torch.nn.Parameter(torch.tensor(0.5))


def micro_batch(x, y):
    return {"x": torch.tensor(x), "y": torch.tensor(y), "attention_mask": torch.ones(1, 3)}


def setup_step(accumulation):
    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = TwoParameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def squared_error(model):
    def loss_fn(batch):
        loss = (model.w * batch["x"] + model.b - batch["y"]) ** 2
        return loss, loss, 0, 0
    return loss_fn


def test_optimizer_step_matches_hand_computed_adamw():
    accelerator, model, optimizer = setup_step(accumulation=2)
    batches = [micro_batch(2.0, 1.0), micro_batch(-1.0, 3.0)]
    stats = train.optimizer_step(accelerator, model, optimizer, list(model.parameters()), batches,
                                 squared_error(model), max_grad_norm=0)
    # gradients of the mean of the two squared errors at w=1, b=0.5: residuals r1 = 2+0.5-1 = 1.5, r2 = -1+0.5-3 = -3.5
    grad_w = (2 * 1.5 * 2.0 + 2 * -3.5 * -1.0) / 2  # 6.5
    grad_b = (2 * 1.5 + 2 * -3.5) / 2  # -2.0
    for name, start, grad in (("w", 1.0, grad_w), ("b", 0.5, grad_b)):
        # AdamW's first step: decay p <- p (1 - lr wd), then p <- p - lr m_hat / (sqrt(v_hat) + eps), m_hat = g,
        # v_hat = g^2
        expected = start * (1 - 0.1 * 0.01) - 0.1 * grad / (abs(grad) + 1e-8)
        assert getattr(model, name).item() == pytest.approx(expected, abs=1e-6)
    assert not stats.skipped and stats.tokens == 6
    assert stats.loss == pytest.approx((1.5 ** 2 + 3.5 ** 2) / 2)


def test_optimizer_step_drops_a_step_with_a_non_finite_micro_batch():
    accelerator, model, optimizer = setup_step(accumulation=2)
    finite = squared_error(model)

    def one_nan(batch):
        loss, nll, _, _ = finite(batch)
        return (loss * float("nan"), nll, 0, 0) if batch["x"].item() < 0 else (loss, nll, 0, 0)

    stats = train.optimizer_step(accelerator, model, optimizer, list(model.parameters()),
                                 [micro_batch(2.0, 1.0), micro_batch(-1.0, 3.0)], one_nan, max_grad_norm=1.0)
    assert stats.skipped and stats.grad_norm is None
    assert (model.w.item(), model.b.item()) == (1.0, 0.5)  # weights as they were, no decay either
    # the next, finite step is taken
    stats = train.optimizer_step(accelerator, model, optimizer, list(model.parameters()),
                                 [micro_batch(2.0, 1.0), micro_batch(-1.0, 3.0)], finite, max_grad_norm=1.0)
    assert not stats.skipped and model.w.item() != 1.0


# --- calibrated forgetting ------------------------------------------------------------------------------------------

class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a parameter (2 rows x 3 positions x 2 tokens): row NLLs set by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": self.logits})()


def calibrated_loss(targets, kind="forget", calibration_on="answer"):
    """The forget loss_fn of train.py on two rows whose answer NLLs are ln 2 (row 0) and ln 2 + ln 4 over 2 (row 1)."""
    # row 0: both answer positions uniform (NLL ln 2 each); row 1: position 1 gives the label p = 1/5 (NLL ln 5)
    logits = torch.zeros(2, 3, 2)
    logits[1, 1] = torch.tensor([math.log(4.0), 0.0])
    labels = torch.tensor([[-100, 1, 1], [-100, 1, 1]])
    model = FixedLogits(logits)

    class FakeAccelerator:
        def unwrap_model(self, m):
            return m

    run = type("Run", (), {"model": model, "accelerator": FakeAccelerator()})()
    args = type("Args", (), {"forget_loss": "gi", "retain_loss": "ntp", "alpha": 1.0, "nll_floor": 1e-3,
                             "npo_beta": 0.1, "calibration_on": calibration_on})()
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3),
             "labels": labels, "targets": torch.tensor(targets)}
    loss, nll, at_target, rows = train.make_loss_fn(run, kind, args)(batch)
    return model, loss, nll, at_target, rows


ROW_NLL = (math.log(2), (math.log(2) + math.log(5)) / 2)


def test_row_nlls_of_the_hand_worked_case():
    _, _, nll, _, _ = calibrated_loss([9.0, 9.0])
    logits = torch.zeros(2, 3, 2)
    logits[1, 1] = torch.tensor([math.log(4.0), 0.0])
    per_row = per_sequence_nll(logits, torch.tensor([[-100, 1, 1], [-100, 1, 1]]))
    assert per_row.tolist() == pytest.approx(ROW_NLL)
    assert nll.item() == pytest.approx(sum(ROW_NLL) / 2)


def test_calibration_stops_rows_at_target_and_restarts_below():
    # both rows below their target: gi on the whole batch, alpha / mean NLL
    _, loss, _, at_target, rows = calibrated_loss([5.0, 5.0])
    assert loss.item() == pytest.approx(1 / (sum(ROW_NLL) / 2)) and (at_target, rows) == (0, 2)
    # row 1 has reached its target (1.0 < its NLL 1.15): only row 0 is pushed, alpha / ln 2
    _, loss, _, at_target, rows = calibrated_loss([5.0, 1.0])
    assert loss.item() == pytest.approx(1 / ROW_NLL[0]) and (at_target, rows) == (1, 2)
    # every row at target: an exact zero with zero gradients (the forget term is off)
    model, loss, _, at_target, _ = calibrated_loss([0.5, 1.0])
    assert loss.item() == 0 and at_target == 2
    loss.backward()
    assert torch.count_nonzero(model.logits.grad) == 0
    # a row that falls back below its target is pushed again: the same batch with a higher target
    _, loss, _, at_target, _ = calibrated_loss([0.5, 2.0])
    assert loss.item() == pytest.approx(1 / ROW_NLL[1]) and at_target == 1


def test_calibration_on_text_measures_every_token():
    # every token of the rows is token 0 (input_ids zeros): the text NLL covers positions 0 and 1 predicting token 0.
    # row 0: uniform logits, ln 2 at both; row 1: ln 2, then logits (ln 4, 0) give token 0 p = 4/5, NLL ln 1.25
    text_nll = (math.log(2), (math.log(2) + math.log(1.25)) / 2)  # 0.693, 0.458
    # targets 0.5: on answer NLL (0.693, 1.151) both rows are at target; on text NLL only row 0 is
    _, loss, _, at_target, _ = calibrated_loss([0.5, 0.5], calibration_on="answer")
    assert loss.item() == 0 and at_target == 2
    _, loss, _, at_target, _ = calibrated_loss([0.5, 0.5], calibration_on="text")
    assert text_nll[1] < 0.5 < text_nll[0] and at_target == 1
    assert loss.item() == pytest.approx(1 / ROW_NLL[1])  # the forget term itself stays on the answer tokens


def test_calibrated_mixed_batches_zero_the_weight_of_forget_rows_at_target():
    model, loss, _, at_target, rows = None, None, None, None, None
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[-100, 1, 1], [-100, 1, 1]])
    model = FixedLogits(logits)
    run = type("Run", (), {"model": model, "accelerator": None})()
    args = type("Args", (), {"forget_loss": "ga", "retain_loss": "ntp", "alpha": 1.0, "nll_floor": 1e-3,
                             "npo_beta": 0.1, "calibration_on": "answer"})()
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3), "labels": labels,
             "weights": torch.tensor([-1.0, 0.5]), "is_forget": torch.tensor([True, False]),
             "targets": torch.tensor([0.1, math.inf])}
    loss, _, at_target, rows = train.make_loss_fn(run, "mixed", args)(batch)
    assert (at_target, rows) == (1, 1)  # the forget row (NLL ln 2 > 0.1) is at target; retain rows are not counted
    assert loss.item() == pytest.approx(0.5 * math.log(2) / 2)  # only the retain row's 0.5 * NLL, mean over 2 rows
    batch["targets"] = torch.tensor([5.0, math.inf])
    loss, _, at_target, _ = train.make_loss_fn(run, "mixed", args)(batch)
    assert at_target == 0 and loss.item() == pytest.approx((-math.log(2) + 0.5 * math.log(2)) / 2)


def test_calibration_levels_are_per_task_and_kind(tiny_model_dir, tiny_tokenizer, tmp_path):
    from modeling import load_model
    from batches import pad_batch
    from records import encode_example, load_records

    data = make_unlearning_data(tmp_path / "data", n_docs=6)
    rows = load_records(os.path.join(data, "retain.jsonl"))
    model = load_model(tiny_model_dir, "float32")
    args = train.DataArguments(max_length=64)
    levels, caps = train.calibration_levels(model, tiny_tokenizer, rows, args, torch.device("cpu"), batch_size=4)
    assert set(levels) == {(f"Task{i}", kind) for i in (1, 2, 3) for kind in ("sc", "qa")} and caps == {}
    # the Task1 sc level by hand: each row alone, unpadded
    task1_sc = [r for r in rows if r.task == "Task1" and r.kind == "sc"]
    nlls = []
    with torch.no_grad():
        for r in task1_sc:
            batch = pad_batch([encode_example(tiny_tokenizer, r.input, r.output, 64)], tiny_tokenizer.pad_token_id)
            nlls.append(answer_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"]).item())
    assert levels[("Task1", "sc")] == pytest.approx(sum(nlls) / len(nlls), rel=1e-4)
    # on the whole text: every token after the first, by hand from unpadded rows; the tiny model's outputs are near
    # uniform (every token's NLL about ln V), so its head is randomised to make text and answer levels differ, and
    # the rows are not truncated (at 64 tokens a long sc answer leaves no room for its prompt)
    args = train.DataArguments(max_length=512)
    torch.manual_seed(0)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(std=0.5)
    levels, _ = train.calibration_levels(model, tiny_tokenizer, rows, args, torch.device("cpu"), batch_size=4)
    text_levels, _ = train.calibration_levels(model, tiny_tokenizer, rows, args, torch.device("cpu"), batch_size=4,
                                              calibration_on="text")
    nlls = []
    with torch.no_grad():
        for r in task1_sc:
            ids = torch.tensor([encode_example(tiny_tokenizer, r.input, r.output, 512)["input_ids"]])
            nlls.append(torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:]).item())
    assert text_levels[("Task1", "sc")] == pytest.approx(sum(nlls) / len(nlls), rel=1e-4)
    assert text_levels[("Task1", "sc")] != pytest.approx(levels[("Task1", "sc")], rel=1e-3)
    # the token cap: the 0.9 quantile of the Task1 sc answer tokens' NLLs, by hand from unpadded rows (numpy's
    # linear interpolation, as torch.quantile's default)
    _, caps = train.calibration_levels(model, tiny_tokenizer, rows, args, torch.device("cpu"), batch_size=4,
                                       token_quantile=0.9)
    tokens = []
    with torch.no_grad():
        for r in task1_sc:
            example = encode_example(tiny_tokenizer, r.input, r.output, 512)
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
            nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
            tokens += nll[labels[1:] != -100].tolist()
    assert set(caps) == set(levels)
    assert caps[("Task1", "sc")] == pytest.approx(float(np.quantile(tokens, 0.9)), rel=1e-4)


# --- AILS-NTUA's chunked schedule -----------------------------------------------------------------------------------

def test_chunks_are_disjoint_with_the_retain_ratio():
    examples = {"forget": [{"id": f"f{i}", "input_ids": [1] * (i + 2)} for i in range(10)],
                "retain": [{"id": f"r{i}", "input_ids": [1] * 3} for i in range(6)]}
    args = train.TrainArguments(output_dir="x", schedule="chunked", forget_chunk_size=4, retain_per_forget=2,
                                seed=1)
    mixed, bounds = train.chunk_examples(examples, args)
    forget_seen = []
    assert len(bounds) == 3  # 10 rows in chunks of 4: 4, 4, 2
    for begin, end in bounds:
        chunk = mixed[begin:end]
        forget = [e["id"] for e in chunk if e["source"] == "forget"]
        assert len(chunk) - len(forget) == 2 * len(forget)  # two retain rows per forget row
        assert all(e["weight"] == (-1.0 if e["source"] == "forget" else 0.5) for e in chunk)
        forget_seen += forget
    assert sorted(forget_seen) == sorted(e["id"] for e in examples["forget"])  # each forget row in one chunk
    retain_order = [e["id"] for e in mixed if e["source"] == "retain"]
    assert len(set(retain_order[:6])) == 6  # the retain set is cycled: all used before any repeats


def test_chunked_schedule_runs_chunks_in_turn_with_disjoint_rows_per_process():
    lengths = [5] * 12 + [7] * 12
    bounds = [(0, 12), (12, 24)]
    steps = train.chunked_schedule(lengths, bounds, micro_batch_size=2, micro_batches_per_step=2,
                                   epochs_per_chunk=2, seed=0, epoch=0)
    assert len(steps) == 2 * 2 * 3  # chunks x epochs per chunk x steps per chunk pass (12 rows / 4 per step)
    assert {kind for kind, _ in steps} == {"mixed"}
    for number, (_, micro_batches) in enumerate(steps):
        rows = [i for mb in micro_batches for i in mb]
        chunk = 0 if number < 6 else 1  # chunk 0's passes come first, then chunk 1's
        assert all(bounds[chunk][0] <= i < bounds[chunk][1] for i in rows)
        taken = [train.micro_batch_for(micro_batches, 0, rank, 2) for rank in range(2)]
        assert not set(taken[0]) & set(taken[1])  # 2 processes read disjoint rows


def test_chunked_preset_runs_one_mixed_kind(tmp_path, tiny_model_dir):
    import json

    data = make_unlearning_data(tmp_path / "data", n_docs=3)
    out = str(tmp_path / "out")
    reset_accelerate()
    summary = train.main([os.path.join(train.ROOT, "configs", "ails_ntua.yaml"), "--model_name_or_path",
                          tiny_model_dir, "--data_dir", data, "--output_dir", out, "--per_device_train_batch_size",
                          "4", "--max_steps", "3", "--report_to", "none", "--batch_log", "--no_merge_lora"])
    assert summary == 0
    with open(os.path.join(out, "batch_log", "rank0.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    assert {e["kind"] for e in entries} == {"mixed"}
    ids = [i for e in entries for i in e["ids"]]
    assert any(i.startswith("forget") for i in ids) and any(i.startswith("retain") for i in ids)


def test_token_caps_train_a_chunked_run_differently(tmp_path, tiny_model_dir):
    """--calibration_token_quantile on the recommended preset's schedule: the caps per task and kind are in the
    summary, and they change the trained adapter (the same run without them differs)."""
    import json
    import yaml

    data = make_unlearning_data(tmp_path / "data", n_docs=3)
    heldout = make_unlearning_data(tmp_path / "heldout", n_docs=3, seed=5)
    rows = [dict(json.loads(line), id=json.loads(line)["id"].replace("retain", "held"))
            for line in open(os.path.join(heldout, "retain.jsonl"))]
    calibration = write_jsonl(tmp_path / "calibration.jsonl", rows)
    adapters = {}
    for name, flags in (("plain", []), ("capped", ["--calibration_token_quantile", "0.5"])):
        out = str(tmp_path / name)
        reset_accelerate()
        assert train.main([os.path.join(train.ROOT, "configs", "ails_ntua.yaml"), "--model_name_or_path",
                           tiny_model_dir, "--data_dir", data, "--output_dir", out, "--calibration_file", calibration,
                           "--calibration_margin", "10", "--per_device_train_batch_size", "4", "--max_steps", "2",
                           "--learning_rate", "1e-2", "--report_to", "none", "--no_merge_lora", *flags]) == 0
        summary = yaml.safe_load(open(os.path.join(out, "train_config.yaml")))["result"]
        adapters[name] = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
        if name == "capped":
            caps = summary["calibration_target_nll"]["token caps"]
            assert set(caps) == {k for k in summary["calibration_target_nll"] if k != "token caps"}
            assert all(cap > 0 for cap in caps.values())
        else:
            assert "token caps" not in summary["calibration_target_nll"]
    assert any(not torch.equal(adapters["plain"][k], adapters["capped"][k]) for k in adapters["plain"])


# --- best checkpoint ------------------------------------------------------------------------------------------------

INJECTED = {2: 0.4, 4: 0.9, 6: 0.3}  # dev metric by step: step 4 is the best


def fake_evaluate_dev(preempt_at=None, scores=INJECTED):
    def evaluate_dev(accelerator, model, tokenizer, dev, train_args):
        step = evaluate_dev.calls[-1] + 2 if evaluate_dev.calls else 2
        evaluate_dev.calls.append(step)
        if step == preempt_at:
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM would: checkpoint at the next step and exit
        return {"task_aggregate": scores[step], "metric": scores[step]}
    evaluate_dev.calls = []
    return evaluate_dev


def best_run_argv(data, model, out, *extra):
    return ["--model_name_or_path", model, "--data_dir", data, "--output_dir", out, "--augment", "none",
            "--per_device_train_batch_size", "4", "--max_steps", "6", "--eval_steps", "2", "--metric_for_best_model",
            "task_aggregate", "--learning_rate", "1e-2", "--report_to", "none", "--no_merge_lora", *extra]


def adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def test_best_checkpoint_is_the_step_with_the_best_score_also_after_resume(tmp_path, tiny_model_dir, monkeypatch):
    data = make_unlearning_data(tmp_path / "data", n_docs=4)
    # reference: the same run without evaluation, checkpointing every 2 steps (step 4's trainable weights)
    reset_accelerate()
    ref = str(tmp_path / "ref")
    train.main(best_run_argv(data, tiny_model_dir, ref, "--eval_steps", "0", "--save_steps", "2",
                             "--save_total_limit", "3"))
    four = {k.replace(".default", ""): v for k, v in
            load_file(os.path.join(ref, "checkpoints", "step-4", "model.safetensors")).items()}
    six = adapter(ref)
    assert set(four) == set(six)

    monkeypatch.setattr(train, "evaluate_dev", fake_evaluate_dev())
    reset_accelerate()
    out = str(tmp_path / "best")
    assert train.main(best_run_argv(data, tiny_model_dir, out)) == 0
    assert train.evaluate_dev.calls == [2, 4, 6]
    summary = __import__("yaml").safe_load(open(os.path.join(out, "train_config.yaml")))["result"]
    assert summary["best_step"] == 4 and summary["best_scores"]["metric"] == 0.9 and summary["optimizer_steps"] == 6
    final = adapter(out)
    # the published weights are step 4's, not the last step's
    assert all(torch.allclose(final[k], four[k], atol=1e-6) for k in final)
    assert not all(torch.allclose(final[k], six[k], atol=1e-6) for k in final)

    # preempted after the best step (checkpoint at step 5), resumed: the best is still step 4
    monkeypatch.setattr(train, "evaluate_dev", fake_evaluate_dev(preempt_at=4))
    reset_accelerate()
    out = str(tmp_path / "resumed")
    assert train.main(best_run_argv(data, tiny_model_dir, out)) == train.PREEMPTED_EXIT_CODE
    assert os.path.isfile(os.path.join(out, "checkpoints", "step-5", train.BEST_WEIGHTS))
    monkeypatch.setattr(train, "evaluate_dev", fake_evaluate_dev())
    train.evaluate_dev.calls = [4]  # the resumed run's next evaluation is step 6
    reset_accelerate()
    assert train.main(best_run_argv(data, tiny_model_dir, out, "--resume_from_checkpoint", "latest")) == 0
    summary = __import__("yaml").safe_load(open(os.path.join(out, "train_config.yaml")))["result"]
    assert summary["best_step"] == 4 and summary["resumed_from_step"] == 5
    resumed = adapter(out)
    assert all(torch.allclose(resumed[k], four[k], atol=1e-6) for k in resumed)


PLATEAU = {2: 0.4, 4: 0.9, 6: 0.3, 8: 0.5, 10: 0.95, 12: 0.2}  # best at 4, a better one after two worse ones


def test_early_stopping_ends_after_patience_evaluations_without_a_better_one(tmp_path, tiny_model_dir, monkeypatch):
    """Patience 2: evaluations at 6 and 8 are not better than step 4's, so the run stops after step 8 of 12 and
    publishes step 4's weights (a run without evaluation checkpointed them); patience 3 waits for step 10's
    better score. A preemption after step 6 resumes to the same stop (the count follows from the steps)."""
    data = make_unlearning_data(tmp_path / "data", n_docs=4)
    reset_accelerate()
    ref = str(tmp_path / "ref")
    train.main(best_run_argv(data, tiny_model_dir, ref, "--eval_steps", "0", "--max_steps", "12", "--save_steps", "4"))
    four = {k.replace(".default", ""): v for k, v in
            load_file(os.path.join(ref, "checkpoints", "step-4", "model.safetensors")).items()}

    def run(out, patience, *extra, preempt_at=None, calls=None):
        evaluate_dev = fake_evaluate_dev(preempt_at, scores=PLATEAU)
        evaluate_dev.calls.extend(calls or [])
        monkeypatch.setattr(train, "evaluate_dev", evaluate_dev)
        reset_accelerate()
        code = train.main(best_run_argv(data, tiny_model_dir, str(tmp_path / out), "--max_steps", "12",
                                        "--early_stopping_patience", str(patience), *extra))
        return code, evaluate_dev.calls

    assert run("p2", 2) == (0, [2, 4, 6, 8])
    summary = __import__("yaml").safe_load(open(tmp_path / "p2" / "train_config.yaml"))["result"]
    assert summary["stopped_on_plateau"] and summary["optimizer_steps"] == 8 and summary["planned_steps"] == 12
    assert summary["best_step"] == 4 and summary["best_scores"]["metric"] == 0.9
    final = adapter(str(tmp_path / "p2"))
    assert all(torch.allclose(final[k], four[k], atol=1e-6) for k in final)
    assert "early stopping: 2 dev evaluations without a better one" in open(tmp_path / "p2" / "README.md").read()

    assert run("p3", 3) == (0, [2, 4, 6, 8, 10, 12])
    summary = __import__("yaml").safe_load(open(tmp_path / "p3" / "train_config.yaml"))["result"]
    assert not summary["stopped_on_plateau"] and summary["optimizer_steps"] == 12 and summary["best_step"] == 10

    assert run("resumed", 2, preempt_at=6)[0] == train.PREEMPTED_EXIT_CODE
    assert run("resumed", 2, "--resume_from_checkpoint", "latest", calls=[2, 4, 6]) == (0, [2, 4, 6, 8])
    summary = __import__("yaml").safe_load(open(tmp_path / "resumed" / "train_config.yaml"))["result"]
    assert summary["stopped_on_plateau"] and summary["optimizer_steps"] == 8 and summary["best_step"] == 4
    assert summary["resumed_from_step"] == 7


@pytest.mark.slow
def test_best_checkpoint_across_two_processes(tmp_path, tiny_model_dir):
    """Real dev evaluations (rows sharded over 2 processes): the same best step and adapter as 1 process x 2
    accumulation steps, and the best step is the one with the highest printed dev metric."""
    data = make_unlearning_data(tmp_path / "data", n_docs=4)
    calibration = make_unlearning_data(tmp_path / "heldout", n_docs=3, seed=5)
    rows = [dict(r, id=r["id"].replace("retain", "held")) for r in
            __import__("json").loads("[" + ",".join(open(os.path.join(calibration, "retain.jsonl"))) + "]")]
    calibration_file = write_jsonl(tmp_path / "calibration.jsonl", rows)
    results = {}
    for processes in (1, 2):
        out = str(tmp_path / f"p{processes}")
        result = launch(processes, "--model_name_or_path", tiny_model_dir, "--data_dir", data, "--output_dir", out,
                        "--augment", "none", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
                        str(2 // processes), "--max_steps", "6", "--eval_steps", "2", "--eval_max_new_tokens", "4",
                        "--calibration_file", calibration_file, "--learning_rate", "1e-2", "--report_to", "none",
                        "--lora_dropout", "0", "--no_merge_lora")  # dropout masks differ per process by design
        metrics = {int(m.group(1)): float(m.group(2))
                   for m in re.finditer(r"step (\d+): dev task_mia_mean ([0-9.]+)", result.stdout)}
        summary = __import__("yaml").safe_load(open(os.path.join(out, "train_config.yaml")))["result"]
        assert sorted(metrics) == [2, 4, 6]
        assert summary["best_step"] == max(metrics, key=lambda s: (metrics[s], -s))
        assert "calibration_target_nll" in summary
        results[processes] = (summary["best_step"], adapter(out))
    assert results[1][0] == results[2][0]
    assert all(torch.allclose(results[1][1][k], results[2][1][k], atol=1e-5) for k in results[1][1])


def test_token_cap_stops_the_gradient_of_tokens_at_the_cap():
    """A hand-worked case: one forget row of three answer tokens (and a -100 prompt position), cap 1.0. The loss
    value is the plain mean NLL; only the tokens below the cap get a gradient, each 1/3 of d NLL_t."""
    from objectives import batch_loss, capped_sequence_nll, per_sequence_nll

    torch.manual_seed(0)
    logits = torch.randn(1, 5, 4)
    logits[0, 1, 2] = 6.0   # token 2 at position 2: NLL ~0 (below the cap)
    logits[0, 2, 0] = -6.0  # token 0 at position 3: NLL ~ 7 (above the cap)
    logits.requires_grad_(True)
    labels = torch.tensor([[-100, -100, 2, 0, 1]])
    nll = -torch.log_softmax(logits[0, 1:4].detach(), dim=-1)[torch.arange(3), torch.tensor([2, 0, 1])]
    cap = torch.tensor([1.0])
    assert nll[0] < 1.0 < nll[1]
    capped = capped_sequence_nll(logits, labels, cap)
    assert capped.item() == pytest.approx(nll.mean().item(), rel=1e-6)  # the value is unchanged
    capped.sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    # by hand: d/dlogits of NLL_t = softmax - onehot at the positions that pass (those below the cap), / 3
    expected = torch.zeros_like(logits)
    for position, token, passes in ((1, 2, nll[0] < 1.0), (2, 0, nll[1] < 1.0), (3, 1, nll[2] < 1.0)):
        if passes:
            onehot = torch.nn.functional.one_hot(torch.tensor(token), 4).float()
            expected[0, position] = (torch.softmax(logits[0, position].detach(), -1) - onehot) / 3
    assert torch.allclose(grad, expected, atol=1e-6)
    assert grad[0, 2].abs().sum() == 0  # the token above the cap gets nothing
    # an infinite cap (a retain row of a mixed batch) is per_sequence_nll with every gradient
    per_sequence_nll(logits, labels).sum().backward()
    plain = logits.grad.clone()
    logits.grad = None
    capped_sequence_nll(logits, labels, torch.tensor([float("inf")])).sum().backward()
    assert torch.allclose(logits.grad, plain)
    logits.grad = None
    # through batch_loss: ga on a forget batch = -mean token NLL, capped; and a mixed batch's weighted row mean
    loss, _ = batch_loss("forget", logits, labels, "ga", "ntp", token_caps=cap)
    assert loss.item() == pytest.approx(-nll.mean().item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(logits.grad, -expected, atol=1e-6)
    logits.grad = None
    loss, _ = batch_loss("mixed", logits, labels, row_weights=torch.tensor([-1.0]), token_caps=cap)
    loss.backward()
    assert torch.allclose(logits.grad, -expected, atol=1e-6)
    with pytest.raises(ValueError, match="NLL-based"):
        batch_loss("forget", logits, labels, "npo", "ntp", reference_logits=logits.detach(), token_caps=cap)
