"""Token rows into model batches: padding (train.py, generation.py, mia.py, mmlu.py), and passes over many
sequences in batches of similar length with results back in input order (the one batching rule of evaluation)."""

import torch
from tqdm.auto import tqdm


def progress(total, desc, show):
    return tqdm(total=total, desc=desc, disable=not show, dynamic_ncols=True)


def length_batches(lengths, batch_size):
    """Index batches of similar length, longest first (an out-of-memory shows at once).

    A sequence also starts a new batch when padding it to the batch's longest would more than double it (+32
    tokens of slack): a short QA question padded to a 300-token story prompt costs a full prefill and, on a
    compute-bound CPU, a full decoding row, for nothing.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] <= 2 * lengths[i] + 32:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def map_length_batches(encoded, batch_size, run_batch, desc, show_progress=False):
    """``run_batch(indices) -> [result per index]`` over length_batches of the encoded sequences, with a progress
    bar; the results in input order."""
    results = [None] * len(encoded)
    bar = progress(len(encoded), desc, show_progress)
    for batch in length_batches([len(ids) for ids in encoded], batch_size):
        for i, row in zip(batch, run_batch(batch)):
            results[i] = row
        bar.update(len(batch))
    bar.close()
    return results


def pad_batch(examples, pad_token_id, padding_side="right"):
    """Pad a list of {input_ids, labels} to the longest in the batch; labels and attention mask 0/-100 on padding."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids, labels, attention_mask = [], [], []
    for example in examples:
        n_pad = width - len(example["input_ids"])
        ids, mask = example["input_ids"], [1] * len(example["input_ids"])
        labs = example.get("labels", ids)
        if padding_side == "right":
            input_ids.append(ids + [pad_token_id] * n_pad)
            labels.append(labs + [-100] * n_pad)
            attention_mask.append(mask + [0] * n_pad)
        else:
            input_ids.append([pad_token_id] * n_pad + ids)
            labels.append([-100] * n_pad + labs)
            attention_mask.append([0] * n_pad + mask)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
    }
