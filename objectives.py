"""Per-kind training losses. A batch is of one kind (retain, forget or idk); its loss comes from its answer NLL.

L_ntp is the mean token negative log-likelihood of the answer tokens (labels != -100) of a batch, the same quantity
Hugging Face's causal-LM loss computes. The forget objectives of Sun & Li (2025) turn it around:
  gi  : alpha / L_ntp           (gradient interference, paper eq. 2)
  gi2 : (alpha / L_ntp) ** 2    (the squared variant, paper Table 5)
  ga  : -L_ntp                  (gradient ascent baseline)
  ntp : L_ntp                   (plain fine-tuning: how a memorised target model is built)
  npo : Negative Preference Optimization (Zhang et al., 2024), against a frozen reference
Retain batches use L_ntp, or ``kl`` (KL from the frozen reference's token distribution) or ``ntp_kl`` (both).
"""

import torch
import torch.nn.functional as F

FORGET_LOSSES = ("gi", "gi2", "ga", "ntp", "npo", "none")
RETAIN_LOSSES = ("ntp", "kl", "ntp_kl", "none")
NEEDS_REFERENCE = {"npo", "kl", "ntp_kl"}  # objectives that compare with the frozen model
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


def sequence_logprob(logits, labels):
    """Sum of answer-token log-probabilities of each sequence (B,): log p(y | x)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    return -(token_nll * (shift_labels != -100).float()).sum(dim=1)


def npo_loss(logprob, reference_logprob, beta=0.1):
    """NPO: mean over sequences of -(2/beta) log sigmoid(-beta (log p(y|x) - log p_ref(y|x)))."""
    return (-2.0 / beta * F.logsigmoid(-beta * (logprob - reference_logprob))).mean()


def kl_to_reference(logits, reference_logits, labels):
    """Mean over answer tokens of KL(p_ref || p) between the next-token distributions."""
    mask = (labels[:, 1:] != -100).float()
    log_p = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    log_ref = F.log_softmax(reference_logits[:, :-1, :].float(), dim=-1)
    kl = (log_ref.exp() * (log_ref - log_p)).sum(dim=-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


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


def batch_loss(batch_kind, logits, labels, forget_objective="gi", retain_objective="ntp", alpha=1.0,
               floor=NLL_FLOOR, reference_logits=None, npo_beta=0.1):
    """(loss, L_ntp) of one batch: forget batches use the forget objective, retain batches the retain objective,
    idk batches L_ntp. ``reference_logits`` (the frozen model's) are needed by npo, kl and ntp_kl."""
    nll = answer_nll(logits, labels)
    if batch_kind == "forget":
        if forget_objective == "npo":
            loss = npo_loss(sequence_logprob(logits, labels), sequence_logprob(reference_logits, labels), npo_beta)
        else:
            loss = forget_loss(nll, forget_objective, alpha, floor)
    elif batch_kind == "retain" and retain_objective in ("kl", "ntp_kl"):
        kl = kl_to_reference(logits, reference_logits, labels)
        loss = kl if retain_objective == "kl" else nll + kl
    else:
        loss = nll
    return loss, nll


def zero_loss(model):
    """A loss of exactly 0 that touches every trainable parameter: backward gives zero gradients on every rank,
    keeping DDP/DeepSpeed hooks and accumulation counters in step when a batch's real loss must be dropped."""
    return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)


def is_finite(loss):
    return bool(torch.isfinite(loss.detach()).all())
