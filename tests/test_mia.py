"""mia.py's attacks against values worked out by hand or by a direct, unbatched computation on the tiny model."""

import copy
import math

import pytest
import torch

import evaluate
import mia
import scoring
from conftest import CORPUS, build_tiny_model, build_tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer).eval(), tokenizer


# --- per-document statistics ----------------------------------------------------------------------------------------

def direct_statistics(model, tokenizer, document, k):
    """Min-K% and Min-K%++ of one document, position by position with torch.log_softmax (no batching, no padding)."""
    ids = tokenizer(document)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    token_log_probs, normalised = [], []
    for t in range(len(ids) - 1):
        log_p = torch.log_softmax(logits[t], dim=-1)
        p = log_p.exp()
        mu = float((p * log_p).sum())  # E_{z~p}[log p(z)]
        sigma = math.sqrt(float((p * log_p ** 2).sum()) - mu ** 2)
        token_log_probs.append(float(log_p[ids[t + 1]]))
        normalised.append((token_log_probs[-1] - mu) / sigma)
    n = math.ceil(k * len(token_log_probs))
    return {"loss": -sum(token_log_probs) / len(token_log_probs),
            "min_k": sum(sorted(token_log_probs)[:n]) / n, "min_k_plus_plus": sum(sorted(normalised)[:n]) / n}


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_min_k_and_min_k_plus_plus_match_a_direct_computation(model_and_tokenizer, k):
    model, tokenizer = model_and_tokenizer
    batched = mia.document_statistics(model, tokenizer, CORPUS, batch_size=3, k=k)  # padded batches
    for document, stats in zip(CORPUS, batched):
        expected = direct_statistics(model, tokenizer, document, k)
        for key in ("loss", "min_k", "min_k_plus_plus"):
            assert stats[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key


def test_statistics_batched_equal_batch_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    one = mia.document_statistics(model, tokenizer, CORPUS, batch_size=1)
    batched = mia.document_statistics(model, tokenizer, CORPUS, batch_size=4)
    for a, b in zip(one, batched):
        assert a.keys() == b.keys() == {"loss", "min_k", "min_k_plus_plus", "zlib"}
        for key in a:
            # float32 noise only: a padded product sums in another order (about 1e-6 relative in the logits), and
            # Min-K%++ divides by the vocabulary's std, which amplifies it to ~1e-5 on some CPUs; a padding bug
            # (pad positions scored or a row shifted) moves these statistics by far more than 1e-4
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    # document_losses keeps its return value: the loss alone.
    assert mia.document_losses(model, tokenizer, CORPUS, batch_size=4) == [row["loss"] for row in batched]


def test_lowest_k_mean_by_hand():
    values = [-0.5, -3.0, -1.0, -4.0, -2.0]
    assert mia.lowest_k_mean(values, 0.2) == -4.0                  # ceil(1.0) = 1 value
    assert mia.lowest_k_mean(values, 0.5) == (-4 - 3 - 2) / 3      # ceil(2.5) = 3
    assert mia.lowest_k_mean(values, 1.0) == -10.5 / 5
    assert mia.lowest_k_mean(values, 0.01) == -4.0                 # at least one
    fifteen = [-float(i) for i in range(15)]                      # 0.2 * 15 is 3.0000000000000004: still 3 values
    assert mia.lowest_k_mean(fifteen, 0.2) == (-14 - 13 - 12) / 3
    assert math.isnan(mia.lowest_k_mean([], 0.2))


def test_zlib_ratio_on_known_strings():
    # zlib: 2 header bytes + a fixed-Huffman block (3 bits, 8 bits per ASCII literal, 7-bit end code, to a byte)
    # + 4 Adler-32 bytes. 'abc': 3 + 24 + 7 = 34 bits = 5 bytes -> 11. 'é' is 2 UTF-8 bytes (0xc3 0xa9), 9-bit
    # literals: 3 + 18 + 7 = 28 bits = 4 bytes -> 10.
    assert mia.zlib_ratio(2.2, "abc") == pytest.approx(2.2 / 11)
    assert mia.zlib_ratio(1.0, "é") == pytest.approx(1.0 / 10)


# --- attack scores --------------------------------------------------------------------------------------------------

def test_attack_results_by_hand():
    rows = [{"set": "member", "loss": 1.0, "min_k": -2.0, "min_k_plus_plus": 0.5, "zlib": 0.01, "reference_loss": 3.0},
            {"set": "member", "loss": 2.0, "min_k": -5.0, "min_k_plus_plus": -1.0, "zlib": 0.03, "reference_loss": 2.5},
            {"set": "nonmember", "loss": 1.5, "min_k": -3.0, "min_k_plus_plus": 0.0, "zlib": 0.02,
             "reference_loss": 1.0}]
    results = mia.attack_results(rows)
    # Min-K%: members -2, -5 vs nonmember -3 -> one of two pairs ranks the member higher: 0.5.
    assert results["mia_min_k_auc"] == 0.5 and results["mia_min_k_score"] == 1.0
    assert results["mia_min_k_plus_plus_auc"] == 0.5
    # zlib: lower is more member-like; 0.01 < 0.02 < 0.03 -> 0.5.
    assert results["mia_zlib_auc"] == 0.5
    # reference = loss - reference loss: members -2.0, -0.5 vs nonmember +0.5: both lower -> AUC 1, score 0.
    assert results["mia_reference_auc"] == 1.0 and results["mia_reference_score"] == 0.0
    del rows[0]["reference_loss"]
    assert "mia_reference_auc" not in mia.attack_results(rows)  # absent without a reference model
    with pytest.raises(ValueError, match="NaN"):
        mia.attack_results([{**rows[1], "min_k": math.nan}, rows[2]])


def test_reference_attack_is_the_loss_difference(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    reference = build_tiny_model(tokenizer, seed=1).eval()
    members, nonmembers = [("m0", CORPUS[0]), ("m1", CORPUS[1])], [("n0", CORPUS[2]), ("n1", CORPUS[3])]
    reference_losses = evaluate.reference_document_losses(reference, tokenizer, members, nonmembers, batch_size=2)
    assert reference_losses == pytest.approx(mia.document_losses(reference, tokenizer, CORPUS, batch_size=1),
                                             rel=1e-5)
    results, tables = evaluate.evaluate_model(model, tokenizer, member_documents=members,
                                              nonmember_documents=nonmembers, batch_size=2,
                                              reference_losses=reference_losses)
    losses = [row["loss"] for row in tables["mia"]]
    assert [row["reference_loss"] for row in tables["mia"]] == reference_losses
    differences = [loss - ref for loss, ref in zip(losses, reference_losses)]
    expected = scoring.membership_auc([-d for d in differences[:2]], [-d for d in differences[2:]])
    assert results["mia_reference_auc"] == expected
    assert results["mia_reference_score"] == 1 - 2 * abs(expected - 0.5)


def test_every_attack_ranks_fitted_members_higher(model_and_tokenizer):
    """Members the model was fitted to (lower loss) give AUC > 0.5 under every attack: the orientation is right."""
    model, tokenizer = model_and_tokenizer
    fitted = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(fitted.parameters(), lr=1e-2)
    member_ids = [torch.tensor([tokenizer(text)["input_ids"]]) for text in CORPUS[:2]]
    for _ in range(15):
        for ids in member_ids:
            optimizer.zero_grad()
            fitted(ids, labels=ids).loss.backward()
            optimizer.step()
    fitted.eval()
    members, nonmembers = [("m0", CORPUS[0]), ("m1", CORPUS[1])], [("n0", CORPUS[2]), ("n1", CORPUS[3])]
    reference_losses = evaluate.reference_document_losses(model, tokenizer, members, nonmembers)
    results, tables = evaluate.evaluate_model(fitted, tokenizer, member_documents=members,
                                              nonmember_documents=nonmembers, reference_losses=reference_losses)
    assert max(row["loss"] for row in tables["mia"][:2]) < min(row["loss"] for row in tables["mia"][2:])
    for name in ("loss",) + tuple(mia.ATTACKS):
        auc_key, score_key = mia.result_keys(name)
        assert results[auc_key] > 0.5, name
        assert results[score_key] == pytest.approx(1 - 2 * abs(results[auc_key] - 0.5)), name


def test_old_mia_csv_without_attack_columns_still_rescores(tmp_path):
    (tmp_path / "forget.csv").write_text("id,task,input,expected_output,model_output\nasc1,Task1,a,b c,b c\n")
    (tmp_path / "mia_losses.csv").write_text("set,id,loss\nmember,m,1.0\nnonmember,n,2.0\n")
    results = evaluate.compute_results(evaluate.load_predictions(str(tmp_path)))
    assert results["mia_loss_acc"] == 1.0
    assert not any(key.startswith(("mia_min_k", "mia_zlib", "mia_reference")) for key in results)
