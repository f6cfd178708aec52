"""Per-kind training losses. A batch is of one kind (retain, forget or idk); its loss comes from its answer NLL.

L_ntp is the mean token negative log-likelihood of the answer tokens (labels != -100) of a batch, the same quantity
Hugging Face's causal-LM loss computes. The forget objectives of Sun & Li (2025) turn it around:
  gi  : alpha / L_ntp           (gradient interference, paper eq. 2)
  gi2 : (alpha / L_ntp) ** 2    (the squared variant, paper Table 5)
  ga  : -L_ntp                  (gradient ascent baseline)
  ntp : L_ntp                   (plain fine-tuning: how a memorised target model is built)
"""

import torch
import torch.nn.functional as F

FORGET_LOSSES = ("gi", "gi2", "ga", "ntp", "none")
# alpha / L explodes as L -> 0 on memorised text. The value is floored at NLL_FLOOR (so the loss is at most
# alpha / NLL_FLOOR), while the gradient of L still flows: a fully memorised answer is still pushed away.
NLL_FLOOR = 1e-3


def answer_nll(logits, labels):
    """Mean token NLL over positions whose (shifted) label is not -100; logits (B, T, V), labels (B, T)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=-100)


def per_sequence_nll(logits, labels):
    """Mean token NLL of each sequence (B,), over its non -100 labels; used by evaluation and tests."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    mask = (shift_labels != -100).float()
    return (token_nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def floored(nll, floor=NLL_FLOOR):
    """max(nll, floor) in value, with the gradient of nll (straight-through), so 1/nll stays finite."""
    return nll + (floor - nll).clamp(min=0).detach()


def forget_loss(nll, kind, alpha=1.0, floor=NLL_FLOOR):
    """The forget objective ``kind`` applied to a batch's answer NLL."""
    if kind == "gi":
        return alpha / floored(nll, floor)
    if kind == "gi2":
        return (alpha / floored(nll, floor)) ** 2
    if kind == "ga":
        return -nll
    if kind == "ntp":
        return nll
    raise ValueError(f"unknown forget loss {kind!r}; expected one of {', '.join(FORGET_LOSSES[:-1])}")


def batch_loss(batch_kind, nll, forget_objective="gi", alpha=1.0, floor=NLL_FLOOR):
    """Loss of a batch of kind retain/idk (plain L_ntp) or forget (the chosen forget objective)."""
    if batch_kind == "forget":
        return forget_loss(nll, forget_objective, alpha, floor)
    return nll


def zero_loss(model):
    """A loss of exactly 0 that touches every trainable parameter: backward gives zero gradients on every rank,
    keeping DDP/DeepSpeed hooks and accumulation counters in step when a batch's real loss must be dropped."""
    return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)


def is_finite(loss):
    return bool(torch.isfinite(loss.detach()).all())
