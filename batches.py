"""Model passes over many sequences in batches of similar length, results back in input order: the one batching
rule of generation.py, mia.py and mmlu.py."""


def progress(total, desc, show):
    from tqdm.auto import tqdm

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
