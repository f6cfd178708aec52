"""Training speed without changing results: --padding_free (packed rows give the padded rows' logits, losses and
gradients), one collective per optimizer step, and the padding share train.py reports."""

import json
import os

import pytest
import torch

import modeling
import train
from conftest import make_unlearning_data, reset_accelerate
from modeling import load_tokenizer
from objectives import batch_loss, per_sequence_nll
from test_calibration import micro_batch, setup_step, squared_error


def rows_of_lengths(lengths, vocab=60, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return rows


@pytest.mark.parametrize("attention", ["sdpa", modeling.PACKED_SDPA])
def test_packed_rows_give_the_padded_losses_and_gradients(tiny_model_dir, attention, monkeypatch):
    """Packed rows, through sdpa's block-diagonal mask or modeling.PACKED_SDPA's per-row attention, give the padded
    rows' losses and gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.set_attn_implementation(attention)
    rows = rows_of_lengths([7, 3, 12, 5])
    segments = attention == modeling.PACKED_SDPA
    padded, packed = train.pad_batch(rows, 0), train.pack_batch(rows, segments=segments)
    assert packed["packed_input_ids"].shape == (1, 27) and packed["position_ids"][0, 7:10].tolist() == [0, 1, 2]
    assert packed.get("packed_segments") == (((0, 7), (7, 10), (10, 22), (22, 27)) if segments else None)
    sdpa, calls = modeling.sdpa_attention_forward, []
    monkeypatch.setattr(modeling, "sdpa_attention_forward", lambda module, query, *a, **k: calls.append(
        (query.shape[2], a[2] is None)) or sdpa(module, query, *a, **k))
    # scored: the labelled tokens (the second half of each row), logits one position before each
    assert packed["labels"].shape == (4, 1 + 6) and packed["logits_index"][:4].tolist() == [2, 3, 4, 5]
    assert packed["labels"][1].tolist() == [-100, *rows[1]["input_ids"][1:], -100, -100, -100, -100]
    a = train.forward_logits(model, padded)
    assert calls == [(12, False)] * model.config.num_hidden_layers * segments  # padded rows: plain sdpa, with mask
    calls.clear()
    b = train.forward_logits(model, packed)
    assert calls == [(7, True), (3, True), (12, True), (5, True)] * model.config.num_hidden_layers * segments
    assert b.shape == (4, 7, a.size(-1))  # logits of 4 x 7 positions instead of 4 x 12
    labels, compact, weights = padded["labels"], packed["labels"], torch.tensor([-1.0, 0.5, -1.0, 0.5])
    for kind, forget, retain in (("forget", "gi", "ntp"), ("forget", "gi2", "ntp"), ("forget", "npo", "ntp"),
                                 ("retain", "gi", "kl"), ("retain", "gi", "ntp"), ("mixed", "gi", "ntp")):
        def loss_of(logits, labels):
            return batch_loss(kind, logits, labels, forget, retain, reference_logits=logits.detach() * 0.9,
                              row_weights=weights)[0]
        assert torch.allclose(loss_of(a, labels), loss_of(b, compact), atol=1e-5), (kind, forget, retain)
    assert torch.allclose(per_sequence_nll(a, labels), per_sequence_nll(b, compact), atol=1e-5)
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        batch_loss("forget", train.forward_logits(model, batch), batch["labels"], "gi")[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    # --calibration_on text measures every token: then every position is scored
    text = train.pack_batch(rows, every_token=True)
    assert torch.allclose(per_sequence_nll(a, train.calibration_labels(padded, "text")),
                          per_sequence_nll(train.forward_logits(model, text), train.calibration_labels(text, "text")),
                          atol=1e-5)


def test_padding_free_is_refused_for_attention_that_ignores_packed_positions(tmp_path, monkeypatch):
    import importlib

    (tmp_path / "legacy_lm.py").write_text("import torch\n\nclass LegacyLM(torch.nn.Module):\n"
                                           "    config = type('Config', (), {'_attn_implementation': 'eager'})()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    legacy = importlib.import_module("legacy_lm").LegacyLM()
    with pytest.raises(train.InputError, match=r"--padding_free: org/legacy \(LegacyLM, attention eager\).*drop "
                                               r"--padding_free"):
        train.check_padding_free(legacy, "org/legacy")


def test_one_collective_per_optimizer_step_with_the_flags_in_it(monkeypatch):
    accelerator, model, optimizer = setup_step(accumulation=4)
    calls = []
    reduce = accelerator.reduce
    monkeypatch.setattr(accelerator, "reduce", lambda tensor, op: calls.append(tensor.numel()) or reduce(tensor, op))
    batches = [micro_batch(x, 1.0) for x in (2.0, -1.0, 0.5, 3.0)]
    stats = train.optimizer_step(accelerator, model, optimizer, list(model.parameters()), batches,
                                 squared_error(model), max_grad_norm=1.0, flags=lambda: {"stop": True, "late": 0})
    assert len(calls) == 1 and calls[0] == len(train.STEP_SUMS) + 2  # the stats and both flags, in one reduce
    assert stats.flags == {"stop": 1.0, "late": 0.0}
    assert stats.tokens == 12 and stats.positions == 12  # 4 micro-batches of 3 unpadded positions
    assert stats.loss == pytest.approx(sum((x + 0.5 - 1.0) ** 2 for x in (2.0, -1.0, 0.5, 3.0)) / 4)


def test_padding_share_is_what_the_batches_padded_and_padding_free_trains_the_same(tmp_path, tiny_model_dir):
    """The reported padding share, recomputed from the batch log and the rows' lengths; --padding_free trains the
    same adapter as padded batches."""
    import yaml
    from safetensors.torch import load_file

    data = make_unlearning_data(tmp_path / "data", n_docs=5)
    common = [os.path.join(train.ROOT, "configs", "paper.yaml"), "--model_name_or_path", tiny_model_dir,
              "--data_dir", data, "--max_steps", "6", "--per_device_train_batch_size", "3", "--report_to", "none",
              "--batch_log", "--lora_dropout", "0"]  # dropout draws its masks by tensor shape, packed or not
    outputs = {}
    for name, extra in (("padded", []), ("packed", ["--padding_free"])):
        reset_accelerate()
        outputs[name] = str(tmp_path / name)
        assert train.main(common + ["--output_dir", outputs[name]] + extra) == 0
    summary = yaml.safe_load(open(os.path.join(outputs["padded"], "train_config.yaml")))["result"]
    model_args, data_args, train_args = train.parse_arguments(common + ["--output_dir", str(tmp_path / "x")])
    tokenizer = load_tokenizer(tiny_model_dir)
    lengths = {e["id"]: len(e["input_ids"]) for rows in train.build_examples(tokenizer, data_args, train_args).values()
               for e in rows}
    tokens = positions = 0
    with open(os.path.join(outputs["padded"], "batch_log", "rank0.jsonl")) as f:
        for line in f:
            sizes = [lengths[i] for i in json.loads(line)["ids"]]
            tokens, positions = tokens + sum(sizes), positions + max(sizes) * len(sizes)
    assert 0 < summary["padding_share"] == pytest.approx(1 - tokens / positions, abs=1e-4)
    assert summary["tokens_per_second"] > 0
    packed = yaml.safe_load(open(os.path.join(outputs["packed"], "train_config.yaml")))["result"]
    assert packed["padding_share"] == 0  # the packed rows hold no pad token
    a, b = (load_file(os.path.join(outputs[n], "adapter", "adapter_model.safetensors")) for n in ("padded", "packed"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_rows_are_sorted_by_length_within_each_window_of_steps():
    """steps_of: every row once per epoch (plus the wrap-around fill), and within each window of LENGTH_GROUP_STEPS
    steps the rows run from longest to shortest, so a micro-batch holds rows of similar length."""
    import random

    lengths = [random.Random(i).randint(5, 500) for i in range(2 * 8 * train.LENGTH_GROUP_STEPS + 37)]
    steps = train.steps_of(range(len(lengths)), lengths, 4, 2, random.Random(0))
    order = [i for step in steps for micro_batch in step for i in micro_batch]
    assert len(order) == 8 * len(steps) == 8 * -(-len(lengths) // 8)
    assert set(order) == set(range(len(lengths)))
    window = 8 * train.LENGTH_GROUP_STEPS
    for start in range(0, len(order), window):
        block = [lengths[i] for i in order[start:start + window]]
        assert block == sorted(block, reverse=True)
    assert [lengths[i] for i in order] != sorted((lengths[i] for i in order), reverse=True)  # windows, not one sort
    # --schedule chunked keeps the 8-step windows its benchmark was measured with
    chunked = train.chunked_schedule(lengths, [(0, len(lengths))], 4, 2, 1, 42, 0)
    assert [mbs for _, mbs in chunked] == train.steps_of(range(len(lengths)), lengths, 4, 2,
                                                         random.Random("42-0-chunk0-0"), 8)


def test_a_checkpoint_of_another_length_grouping_is_refused(tmp_path):
    """A checkpoint written before the window was recorded (8 steps) would resume on another schedule: refused."""
    old = {key: value for key, value in train.dataclasses.asdict(train.RunState(step=3)).items()
           if key != "length_group_steps"}
    (tmp_path / "trainer_state.json").write_text(json.dumps(old))
    now = train.RunState(length_group_steps=train.LENGTH_GROUP_STEPS)
    with pytest.raises(train.InputError, match=f"written with length_group_steps=8, now {train.LENGTH_GROUP_STEPS}"):
        train.load_checkpoint(None, str(tmp_path), now)
