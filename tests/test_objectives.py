"""Loss values against hand-computed numbers, and the direction of a gradient-interference step."""

import math

import pytest
import torch

from objectives import (answer_nll, batch_loss, floored, forget_loss, kl_to_reference, npo_loss, per_sequence_nll,
                        sequence_logprob, zero_loss)
from batches import pad_batch
from records import encode_example

# One sequence, vocab 2. Position 0 has logits [0, 0]: NLL of token 0 is ln 2. Position 1 has logits [ln 3, 0]:
# p(token 1) = 1 / (3 + 1), NLL ln 4. Position 2's logits predict nothing (no next label).
LOGITS = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
LABELS = torch.tensor([[-100, 0, 1]])
EXPECTED_NLL = (math.log(2) + math.log(4)) / 2  # = 1.5 ln 2


def test_answer_nll_by_hand():
    assert answer_nll(LOGITS, LABELS).item() == pytest.approx(EXPECTED_NLL, rel=1e-6)


def test_prompt_and_padding_masked():
    # a second row that is all prompt/padding (-100) with wild logits must not change the mean
    logits = torch.cat([LOGITS, torch.tensor([[[100.0, -100.0], [-100.0, 100.0], [0.0, 0.0]]])])
    labels = torch.cat([LABELS, torch.tensor([[-100, -100, -100]])])
    assert answer_nll(logits, labels).item() == pytest.approx(EXPECTED_NLL, rel=1e-6)
    # masking the first answer token leaves only position 1's ln 4
    assert answer_nll(LOGITS, torch.tensor([[-100, -100, 1]])).item() == pytest.approx(math.log(4), rel=1e-6)
    per_seq = per_sequence_nll(logits, torch.cat([LABELS, torch.tensor([[-100, 1, -100]])]))
    assert per_seq[0].item() == pytest.approx(EXPECTED_NLL, rel=1e-6)
    assert per_seq[1].item() == pytest.approx(-torch.log_softmax(torch.tensor([100.0, -100.0]), 0)[1].item(), rel=1e-5)


@pytest.mark.parametrize("kind,alpha,expected", [
    ("gi", 2.0, 2.0 / EXPECTED_NLL),
    ("gi2", 2.0, (2.0 / EXPECTED_NLL) ** 2),
    ("ga", 2.0, -EXPECTED_NLL),
    ("ntp", 2.0, EXPECTED_NLL),
])
def test_forget_losses_by_hand(kind, alpha, expected):
    nll = answer_nll(LOGITS, LABELS)
    assert forget_loss(nll, kind, alpha).item() == pytest.approx(expected, rel=1e-6)
    loss, batch_nll = batch_loss("forget", LOGITS, LABELS, kind, alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-6) and batch_nll.item() == pytest.approx(EXPECTED_NLL)
    for other in ("retain", "idk"):
        assert batch_loss(other, LOGITS, LABELS, kind, alpha=alpha)[0].item() == pytest.approx(EXPECTED_NLL, rel=1e-6)


def test_npo_by_hand():
    # log p(y|x) = -(ln 2 + ln 4) = -3 ln 2 for LOGITS; a reference with all-zero logits gives -2 ln 2
    reference = torch.zeros_like(LOGITS)
    assert sequence_logprob(LOGITS, LABELS).item() == pytest.approx(-3 * math.log(2), rel=1e-6)
    assert sequence_logprob(reference, LABELS).item() == pytest.approx(-2 * math.log(2), rel=1e-6)
    ratio = -3 * math.log(2) + 2 * math.log(2)  # log p - log p_ref = -ln 2
    expected = -2 / 0.1 * math.log(1 / (1 + math.exp(0.1 * ratio)))  # -(2/beta) log sigmoid(-beta * ratio)
    loss, _ = batch_loss("forget", LOGITS, LABELS, "npo", reference_logits=reference, npo_beta=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # at the reference itself NPO is (2/beta) ln 2
    assert npo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), 0.1).item() == pytest.approx(20 * math.log(2))


def test_kl_to_reference_by_hand():
    # p = softmax([0, 0]) = (.5, .5); p_ref = softmax([ln 3, 0]) = (.75, .25) at the one answer position
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    reference = torch.tensor([[[math.log(3.0), 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[-100, 1]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_to_reference(logits, reference, labels).item() == pytest.approx(expected, rel=1e-6)
    loss, nll = batch_loss("retain", logits, labels, retain_objective="ntp_kl", reference_logits=reference)
    assert loss.item() == pytest.approx(expected + math.log(2), rel=1e-6)
    assert kl_to_reference(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-7)


def test_lora_reference_is_the_base_model_exactly(tiny_tokenizer):
    """With the adapter disabled, the LoRA model's logits equal the base model's bit for bit."""
    import copy

    from conftest import build_tiny_model
    from modeling import add_lora

    base = build_tiny_model(tiny_tokenizer, seed=3).eval()
    peft_model = add_lora(copy.deepcopy(base), r=8, alpha=32, dropout=0.0).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            reference = peft_model(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    assert torch.equal(reference, expected)
    assert not torch.allclose(adapted, expected)


def test_floor_keeps_gi_finite_and_gradient_flowing():
    nll = torch.tensor(1e-7, requires_grad=True)
    loss = forget_loss(nll, "gi", alpha=1.0, floor=1e-3)
    assert loss.item() == pytest.approx(1e3)
    loss.backward()
    assert nll.grad.item() == pytest.approx(-1.0 / 1e-3 ** 2)  # d(alpha/x)/dx at the floor, not 0
    above = torch.tensor(0.5)
    assert floored(above, 1e-3).item() == 0.5


def test_unknown_forget_loss():
    with pytest.raises(ValueError, match="unknown forget loss"):
        forget_loss(torch.tensor(1.0), "bogus")


def test_zero_loss_gives_zero_gradients(tiny_tokenizer):
    from conftest import build_tiny_model

    model = build_tiny_model(tiny_tokenizer)
    loss = zero_loss(model)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_gi_step_raises_forget_nll(tiny_tokenizer):
    """One optimizer step on a forget batch under gi makes that batch less likely."""
    from conftest import build_tiny_model

    model = build_tiny_model(tiny_tokenizer, seed=1)
    examples = [encode_example(tiny_tokenizer, "Who was born in Paris?", "Marie was born in Paris in 1867.", 64),
                encode_example(tiny_tokenizer, "In the mystical city of", "Deadesius, two sorceresses.", 64)]
    batch = pad_batch(examples, tiny_tokenizer.pad_token_id)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def nll():
        return answer_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["labels"])

    before = nll()
    forget_loss(before, "gi", alpha=1.0).backward()
    optimizer.step()
    with torch.no_grad():
        after = nll()
    assert after.item() > before.item() + 1e-3
