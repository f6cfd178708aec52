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

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

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


def token_nll(logits, labels):
    """(NLL of each shifted label (B, T-1), its mask of scored positions); -100 labels give NLL 0, mask 0."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    return nll, (shift_labels != -100).float()


def capped_token_nll(logits, labels, token_caps):
    """token_nll in value, but a token whose NLL is at or above its row's cap (B,) passes no gradient: a forget
    term built on it stops pushing the tokens that are already as unlikely as the cap (the least likely tokens of
    unseen text), so none is driven far below it. Rows with cap inf keep every gradient."""
    nll, mask = token_nll(logits, labels)
    return torch.where(nll.detach() >= token_caps.to(nll.device)[:, None], nll.detach(), nll), mask


def capped_sequence_nll(logits, labels, token_caps):
    """per_sequence_nll (B,) over capped_token_nll."""
    nll, mask = capped_token_nll(logits, labels, token_caps)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


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
    """The NLL-based forget objective ``kind`` (gi, gi2, ga, ntp) applied to a batch's answer NLL."""
    if kind == "gi":
        return alpha / floored(nll, floor)
    if kind == "gi2":
        return (alpha / floored(nll, floor)) ** 2
    if kind == "ga":
        return -nll
    if kind == "ntp":
        return nll
    raise ValueError(f"unknown forget loss {kind!r} for an NLL-based objective; expected gi, gi2, ga or ntp")


@dataclass(frozen=True)
class Objective:
    """One training objective: loss(logits, labels, reference_logits, settings) -> scalar, where settings has
    alpha, floor and npo_beta; description: what it does, for --help and the model card; needs_reference: the frozen
    model's logits must be computed for its batches."""
    loss: Callable
    description: str
    needs_reference: bool = False


def _nll_objective(kind, description):
    return Objective(lambda logits, labels, ref, s: forget_loss(answer_nll(logits, labels), kind, s.alpha, s.floor),
                     description)


# The one table of objectives: batch kind -> objective name -> Objective. Adding a method is one entry here.
# "none" (no batches of that kind) is a choice, not an entry.
OBJECTIVES = {
    "forget": {
        "gi": _nll_objective("gi", "gradient interference, alpha / L_ntp on the forget answers (Sun & Li, 2025, "
                                   "eq. 2)"),
        "gi2": _nll_objective("gi2", "squared gradient interference, (alpha / L_ntp)^2 on the forget answers "
                                     "(paper Table 5)"),
        "ga": _nll_objective("ga", "gradient ascent, -L_ntp on the forget answers"),
        "ntp": _nll_objective("ntp", "next-token loss on the forget rows (fine-tuning: builds a memorised target, "
                                     "not unlearning)"),
        "npo": Objective(lambda logits, labels, ref, s: npo_loss(sequence_logprob(logits, labels),
                                                                 sequence_logprob(ref, labels), s.npo_beta),
                         "Negative Preference Optimization against the frozen base (Zhang et al., 2024)",
                         needs_reference=True),
    },
    "retain": {
        "ntp": Objective(lambda logits, labels, ref, s: answer_nll(logits, labels), "next-token loss"),
        "kl": Objective(lambda logits, labels, ref, s: kl_to_reference(logits, ref, labels),
                        "KL divergence from the frozen base's next-token distribution", needs_reference=True),
        "ntp_kl": Objective(lambda logits, labels, ref, s: answer_nll(logits, labels)
                            + kl_to_reference(logits, ref, labels), "next-token loss + KL", needs_reference=True),
    },
}
FORGET_LOSSES = tuple(OBJECTIVES["forget"]) + ("none",)
NLL_FORGET_LOSSES = ("gi", "gi2", "ga", "ntp")  # forget_loss(answer NLL): the ones a token cap can act on
RETAIN_LOSSES = tuple(OBJECTIVES["retain"]) + ("none",)


def describe(batch_kind):
    """The objectives of one batch kind as --help text: 'name: description; ...'."""
    return "; ".join(f"{name}: {objective.description}" for name, objective in OBJECTIVES[batch_kind].items())


@dataclass(frozen=True)
class LossSettings:
    alpha: float = 1.0
    floor: float = NLL_FLOOR
    npo_beta: float = 0.1


def objective_for(batch_kind, forget_objective, retain_objective):
    """The Objective a batch of this kind trains with, or None for idk / mixed batches (answer NLL, see batch_loss)."""
    if batch_kind == "forget":
        return OBJECTIVES["forget"][forget_objective]
    if batch_kind == "retain":
        return OBJECTIVES["retain"][retain_objective]
    return None


def needs_reference(batch_kind, forget_objective, retain_objective):
    if (forget_objective if batch_kind == "forget" else retain_objective) == "none":
        return False  # no batches of that kind
    objective = objective_for(batch_kind, forget_objective, retain_objective)
    return objective is not None and objective.needs_reference


def batch_loss(batch_kind, logits, labels, forget_objective="gi", retain_objective="ntp", alpha=1.0,
               floor=NLL_FLOOR, reference_logits=None, npo_beta=0.1, row_weights=None, token_caps=None):
    """(loss, L_ntp) of one batch: forget batches use the forget objective, retain batches the retain objective,
    idk batches L_ntp. ``reference_logits`` (the frozen model's) are needed where the objective says so.

    ``mixed`` batches (forget and retain rows in one batch, AILS-NTUA's schedule) use per-row weights:
    mean_i(row_weights[i] * NLL_i), e.g. -1 on forget rows (gradient ascent) and +0.5 on retain rows.

    ``token_caps`` (B,), forget rows of mixed batches and NLL-based forget objectives: the loss is built on
    capped_sequence_nll, the same value with no gradient through tokens at or above their row's cap."""
    nll = answer_nll(logits, labels)
    if batch_kind == "mixed":
        row_nll = per_sequence_nll(logits, labels) if token_caps is None else capped_sequence_nll(logits, labels,
                                                                                                   token_caps)
        return (row_weights.to(logits.device) * row_nll).mean(), nll
    if batch_kind == "forget" and token_caps is not None:
        if forget_objective not in NLL_FORGET_LOSSES:
            raise ValueError(f"token caps act on NLL-based forget losses ({', '.join(NLL_FORGET_LOSSES)}), not "
                             f"{forget_objective!r}")
        capped, mask = capped_token_nll(logits, labels, token_caps)
        return forget_loss((capped * mask).sum() / mask.sum().clamp(min=1), forget_objective, alpha, floor), nll
    objective = objective_for(batch_kind, forget_objective, retain_objective)
    if objective is None:
        return nll, nll
    return objective.loss(logits, labels, reference_logits, LossSettings(alpha, floor, npo_beta)), nll


def zero_loss(model):
    """A loss of exactly 0 that touches every trainable parameter: backward gives zero gradients on every rank,
    keeping DDP/DeepSpeed hooks and accumulation counters in step when a batch's real loss must be dropped."""
    return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
