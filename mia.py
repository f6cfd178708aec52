"""Membership inference attacks beside the official loss attack: Min-K%, Min-K%++, zlib ratio and a reference model.

A model can reach AUC 0.5 on mean loss (the official attack) and still let the forget set stand out under another
statistic, so evaluate.py reports these too; the official number stays the one in ``aggregate-score``.

Per document, over the scored tokens T (every token but the first, each predicted from the ones before it: the
tokens and tokenisation of the official loss attack):
- loss             mean of -log p(x_t)                          official: ``mia_loss_acc``
- min_k            mean of the ceil(k T) lowest log p(x_t)      Shi et al. 2024: ``mia_min_k_auc``
- min_k_plus_plus  the same over (log p(x_t) - mu_t) / sigma_t  Zhang et al. 2024: ``mia_min_k_plus_plus_auc``
- zlib             loss / len(zlib.compress(text as UTF-8))     Carlini et al. 2021: ``mia_zlib_auc``
- reference        loss - the reference model's loss            ``mia_reference_auc`` (reference = before unlearning)

Every AUC has members as positives and each statistic oriented so that more member-like ranks higher; each also
gets the official transform ``1 - 2|AUC - 0.5|`` as ``mia_<name>_score``.
"""

import math
import zlib

import torch

import scoring
from batches import map_length_batches, pad_batch

DEFAULT_MIN_K = 0.2
# name -> the sign that makes "more member-like" rank higher: higher (normalised) log-probs are more member-like,
# a lower zlib ratio or loss difference is (as a lower loss is).
ATTACKS = {"min_k": 1.0, "min_k_plus_plus": 1.0, "zlib": -1.0, "reference": -1.0}
LABELS = {"loss": "loss (official)", "min_k": "Min-K%", "min_k_plus_plus": "Min-K%++", "zlib": "zlib",
          "reference": "reference"}


# --- per-document statistics ----------------------------------------------------------------------------------------

def token_statistics(logits, targets):
    """(log p(x_t), (log p(x_t) - mu_t) / sigma_t) for logits [T, V] predicting targets [T], in float32.

    mu_t and sigma_t are the mean and standard deviation of log p(z) with z drawn from the model's own distribution
    at position t, as the Min-K%++ paper defines them and its code computes them (zjysteven/mink-plus-plus run.py):
    mu = sum_z p(z) log p(z), sigma = sqrt(sum_z p(z) log p(z)^2 - mu^2), not the plain mean over the vocabulary.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token = log_probs.gather(-1, targets[:, None])[:, 0]
    probs = log_probs.exp()
    mu = (probs * log_probs).sum(dim=-1)
    # The variance can come out a hair below 0 in float32 when the distribution is nearly one-hot.
    sigma = ((probs * log_probs.square()).sum(dim=-1) - mu.square()).clamp(min=1e-12).sqrt()
    return token, (token - mu) / sigma


def lowest_k_mean(values, k=DEFAULT_MIN_K):
    """Mean of the ceil(k * T) lowest of T values (at least one); NaN for no values."""
    values = sorted(float(v) for v in values)
    if not values:
        return float("nan")
    # 1e-9: 0.2 * 15 is 3.0000000000000004 in floating point, and ceil must give 3, not 4.
    n = max(1, math.ceil(k * len(values) - 1e-9))
    return sum(values[:n]) / n


def zlib_ratio(loss, text):
    """Mean token loss over the zlib-compressed size of the text in bytes (lower = more member-like)."""
    return loss / len(zlib.compress(text.encode("utf-8")))


def batch_statistics(model, encoded, texts, pad_id, k=DEFAULT_MIN_K):
    """Per document {loss, min_k, min_k_plus_plus, zlib} for one batch, from one forward pass.

    ``encoded``: token ids as the official loss attack makes them (tokenizer defaults, labels = input ids). Rows are
    right-padded, so padding sits after every real token and causal attention never reads it; a row's statistics
    use only its own T = len(ids) - 1 predicted positions. A one-token document has no scored token: NaN.
    """
    device = next(model.parameters()).device
    padded = pad_batch([{"input_ids": ids} for ids in encoded], pad_id, padding_side="right")
    stats = []
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"].to(device),
                       attention_mask=padded["attention_mask"].to(device)).logits
        for row, (ids, text) in enumerate(zip(encoded, texts)):
            # Position t predicts token t + 1 (as transformers' loss). One row at a time keeps a single
            # [T, vocab] float32 copy in memory instead of the whole batch's.
            n = len(ids) - 1
            token, normalised = token_statistics(logits[row, :n], torch.tensor(ids[1:], device=logits.device))
            loss = -token.sum().item() / n if n else float("nan")
            stats.append({"loss": loss, "min_k": lowest_k_mean(token.tolist(), k),
                          "min_k_plus_plus": lowest_k_mean(normalised.tolist(), k),
                          "zlib": zlib_ratio(loss, text)})
    return stats


# --- attack scores --------------------------------------------------------------------------------------------------

def statistic(row, name):
    """An attack's statistic for one MIA row (its CSV column; the reference one is loss - reference_loss), or None
    when the row lacks it."""
    if name == "reference":
        return None if row.get("reference_loss") is None else row["loss"] - row["reference_loss"]
    return row.get(name)


def member_likeness(row, name):
    """The statistic oriented so that higher = more member-like (None if absent)."""
    value = statistic(row, name)
    return None if value is None else ATTACKS[name] * value


def attack_results(rows):
    """{mia_<name>_auc, mia_<name>_score} for every attack whose statistic every MIA row has.

    rows: dicts with 'set' ('member' or 'nonmember') and the per-document columns. Raises ValueError on NaN or
    when a set is empty (as scoring.mia_auc).
    """
    results = {}
    for name in ATTACKS:
        values = [(row["set"], member_likeness(row, name)) for row in rows]
        if not values or any(value is None for _, value in values):
            continue
        auc = scoring.membership_auc([v for kind, v in values if kind == "member"],
                                     [v for kind, v in values if kind == "nonmember"])
        results[f"mia_{name}_auc"] = auc
        results[f"mia_{name}_score"] = scoring.mia_final_score(auc)
    return results


def result_keys(name):
    """(AUC key, score key) of an attack in evaluation_results.json; 'loss' is the official pair."""
    if name == "loss":
        return "mia_loss_acc", "mia_final_score"
    return f"mia_{name}_auc", f"mia_{name}_score"


def document_losses(model, tokenizer, documents, batch_size=16, show_progress=False):
    """Mean next-token cross-entropy of each whole document (labels = input ids, tokenizer defaults), as
    ``model(ids, labels=ids).loss`` gives it one at a time. Right padding is masked out of the mean.
    """
    return [row["loss"] for row in document_statistics(model, tokenizer, documents, batch_size,
                                                        show_progress=show_progress)]


def document_statistics(model, tokenizer, documents, batch_size=16, k=DEFAULT_MIN_K, show_progress=False):
    """Per document {loss, min_k, min_k_plus_plus, zlib}, the model run once per batch of similar length. ``loss``
    is the official attack's statistic."""
    encoded = [tokenizer(document)["input_ids"] for document in documents]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return map_length_batches(encoded, batch_size, lambda batch: batch_statistics(
        model, [encoded[i] for i in batch], [documents[i] for i in batch], pad_id, k), "mia", show_progress)
