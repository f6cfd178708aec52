"""scoring.py against values worked out by hand (or by a second, naive computation), not by scoring.py itself."""

import itertools
import math

import pytest

import scoring


# --- per-row scores -------------------------------------------------------------------------------------------------

def test_rouge_l_recall_uses_stemming():
    # Stemmed target: he was run quickli to the station (7 tokens); prediction: he run quick to station.
    # Longest common subsequence: he, run, to, station = 4.
    assert scoring.rouge_l_recall("He was running quickly to the stations", "he runs quick to station") == \
        pytest.approx(4 / 7)


def test_rouge_l_recall_is_recall_not_precision():
    # Prediction much longer than the target: recall stays 1.
    assert scoring.rouge_l_recall("the cat", "the cat sat on a very long mat today") == 1.0
    assert scoring.rouge_l_recall("the cat sat", "") == 0.0


def test_exact_match_normalisation():
    assert scoring.exact_match("Paris", "  paris \n") == 1
    assert scoring.exact_match(" 1984-12-31", "1984-12-31") == 1
    assert scoring.exact_match("Paris", "Paris.") == 0
    assert scoring.exact_match("Paris", "Paris, France") == 0
    assert scoring.exact_match("", "") == 1


def test_score_row_by_kind():
    assert scoring.score_row("abcsc1", "a b", "a b") == (1.0, None)
    assert scoring.score_row('"x-y"qa3', "A", "a") == (None, 1)


# --- aggregation ----------------------------------------------------------------------------------------------------

def _rows(values):
    """Rows with one sc and one qa per task, giving each task's regurgitation and knowledge the values asked."""
    rows = []
    for task, (regurg, knowledge) in values.items():
        rows.append({"id": f"{task}sc1", "task": task, "expected_output": "x", "rouge_l_recall": regurg,
                     "exact_match": None})
        rows.append({"id": f"{task}qa0", "task": task, "expected_output": "x", "rouge_l_recall": None,
                     "exact_match": knowledge})
    return rows


def test_terms_order_and_inversion():
    forget = _rows({"Task1": (0.1, 1), "Task2": (0.2, 0), "Task3": (0.3, 1)})
    retain = _rows({"Task1": (0.4, 1), "Task2": (0.5, 0), "Task3": (0.6, 1)})
    results = scoring.task_results(forget, retain)
    assert results["aggregated-terms"] == pytest.approx([0.9, 0.0, 0.8, 1.0, 0.7, 0.0, 0.4, 1.0, 0.5, 0.0, 0.6, 1.0])
    assert results["aggregated-term-names"][0] == "forget/Task1/regurgitation-score"
    assert results["aggregated-term-names"][7] == "retain/Task1/knowledge-score"
    assert results["skipped-terms"] == []
    assert results["forget-set"]["Task2"] == {"regurgitation-score": 0.2, "knowledge-score": 0.0}
    assert results["forget-set"]["overall-regurgitation-score"] == pytest.approx(0.2)
    assert results["forget-set"]["overall-knowledge-score"] == pytest.approx(2 / 3)
    assert results["harmonic-mean-task-aggregate"] == 0.0  # zero terms present


def test_harmonic_mean_by_hand():
    forget = _rows({"Task1": (0.5, 0), "Task2": (0.5, 0), "Task3": (0.5, 0)})
    retain = _rows({"Task1": (0.5, 1), "Task2": (0.5, 1), "Task3": (0.5, 1)})
    results = scoring.task_results(forget, retain)
    # Six terms 0.5 and six terms 1: 12 / (6*2 + 6*1) = 2/3.
    assert results["harmonic-mean-task-aggregate"] == pytest.approx(12 / 18)
    assert scoring.harmonic_mean_terms([0.2, 0.0, 1.0]) == 0
    assert scoring.harmonic_mean_terms([0.25, 1.0]) == pytest.approx(2 / (4 + 1))
    assert scoring.harmonic_mean_terms([]) is None


def test_micro_overall_scores():
    rows = [{"id": "asc1", "task": "Task1", "rouge_l_recall": 1.0, "exact_match": None},
            {"id": "bsc1", "task": "Task2", "rouge_l_recall": 0.0, "exact_match": None},
            {"id": "csc1", "task": "Task2", "rouge_l_recall": 0.0, "exact_match": None}]
    block = scoring.split_scores(rows)
    assert block["overall-regurgitation-score"] == pytest.approx(1 / 3)  # over rows, not over tasks
    assert block["Task2"]["regurgitation-score"] == 0.0
    assert "Task3" not in block


def test_missing_kind_is_skipped_and_named():
    forget = _rows({"Task1": (0.5, 0), "Task2": (0.5, 0), "Task3": (0.5, 0)})
    retain = [row for row in _rows({"Task1": (0.5, 1), "Task2": (0.5, 1), "Task3": (0.5, 1)})
              if not (row["task"] == "Task2" and row["id"].endswith("qa0"))]
    results = scoring.task_results(forget, retain)
    assert results["skipped-terms"] == ["retain/Task2/knowledge-score"]
    assert len(results["aggregated-terms"]) == 11
    assert results["retain-set"]["Task2"]["knowledge-score"] is None
    only_forget = scoring.task_results(forget, None)
    assert len(only_forget["aggregated-terms"]) == 6 and "retain-set" not in only_forget


# --- MIA and final ----------------------------------------------------------------------------------------------

def _naive_auc(positive_scores, negative_scores):
    pairs = list(itertools.product(positive_scores, negative_scores))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_mia_auc_direction_and_value():
    members, nonmembers = [1.0, 2.0, 3.5], [2.5, 3.0, 4.0, 5.0]
    auc = scoring.mia_auc(members, nonmembers)
    assert auc > 0.5  # members have lower loss
    assert auc == pytest.approx(_naive_auc([-x for x in members], [-x for x in nonmembers]))
    assert scoring.mia_auc([1.0], [2.0]) == 1.0
    assert scoring.mia_auc([2.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        scoring.mia_auc([math.nan], [1.0])


def test_mia_final_score():
    assert scoring.mia_final_score(0.5) == 1.0
    assert scoring.mia_final_score(1.0) == 0.0
    assert scoring.mia_final_score(0.0) == 0.0
    assert scoring.mia_final_score(0.75) == pytest.approx(0.5)
    assert scoring.mia_final_score(0.25) == pytest.approx(0.5)


def test_final_aggregate():
    assert scoring.final_aggregate(0.3, 0.6, 0.9) == (pytest.approx(0.6), ["harmonic-mean-task-aggregate",
                                                                          "mia_final_score", "mmlu_average"])
    assert scoring.final_aggregate(0.2, None, 0.4) == (pytest.approx(0.3), ["harmonic-mean-task-aggregate",
                                                                           "mmlu_average"])
    assert scoring.final_aggregate() == (None, [])


def test_final_score_needs_all_three_parts():
    full = scoring.final_score(0.3, 0.6, 0.9)
    assert full == {"aggregate-score": pytest.approx(0.6),
                    "aggregate-score-components": ["harmonic-mean-task-aggregate", "mia_final_score", "mmlu_average"]}
    partial = scoring.final_score(0.2, None, 0.4)  # no MIA: the official script reports no final score
    assert partial["aggregate-score"] is None and partial["aggregate-score-components"] == []
    assert partial["partial-aggregate-score"] == pytest.approx(0.3)
    assert partial["final_score_parts"] == ["harmonic-mean-task-aggregate", "mmlu_average"]
    assert scoring.final_score()["partial-aggregate-score"] is None


def test_final_score_label():
    full = {"harmonic-mean-task-aggregate": 0.3, "mia_final_score": 0.6, "mmlu_average": 0.9, "aggregate-score": 0.6}
    assert scoring.final_score_label(full) == ("final score", 0.6)
    no_mmlu = {"harmonic-mean-task-aggregate": 0.3, "mia_final_score": 0.5, "partial-aggregate-score": 0.4}
    assert scoring.final_score_label(no_mmlu) == ("partial score (no MMLU)", 0.4)
    # A file written before the rule: aggregate-score over two parts is shown as partial too.
    old = {"harmonic-mean-task-aggregate": 0.3, "aggregate-score": 0.3}
    assert scoring.final_score_label(old) == ("partial score (no MIA, no MMLU)", 0.3)


def test_membership_auc_orientation():
    assert scoring.membership_auc([2.0], [1.0]) == 1.0  # higher score = more member-like
    assert scoring.membership_auc([1.0, 3.0], [2.0]) == 0.5
    with pytest.raises(ValueError):
        scoring.membership_auc([], [1.0])


def test_length_breakdown():
    rows = [{"id": "asc1", "expected_output": "one two three", "rouge_l_recall": 1.0},
            {"id": "bsc1", "expected_output": "one two three four five", "rouge_l_recall": 0.2},
            {"id": "cqa0", "expected_output": "x", "exact_match": 1}]
    result = scoring.length_breakdown(rows, threshold=3)
    assert result == {"short": {"n": 1, "regurgitation-score": 1.0}, "long": {"n": 1, "regurgitation-score": 0.2}}


# --- MMLU -----------------------------------------------------------------------------------------------------------

def test_mmlu_prompt_zero_shot_exact_text():
    prompt = scoring.mmlu_prompt("high_school_us_history", "Who was first?", ["Adams", "Washington", "Jefferson",
                                                                              "Lincoln"])
    assert prompt == ("The following are multiple choice questions (with answers) about  high school us history.\n\n"
                      "Who was first?\nA. Adams\nB. Washington\nC. Jefferson\nD. Lincoln\nAnswer:")


def test_mmlu_prompt_with_shots_exact_text():
    shots = [("1+1?", ["1", "2", "3", "4"], "B"), ("2+2?", ["4", "5", "6", "7"], "A")]
    prompt = scoring.mmlu_prompt("abstract_algebra", "3+3?", ["5", "6", "7", "8"], shots)
    assert prompt == ("The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
                      "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                      "2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
                      "3+3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:")


def test_mmlu_pick_highest_logit():
    assert scoring.mmlu_pick([0.1, 2.0, -1.0, 1.9]) == "B"
    assert scoring.mmlu_pick([-3.0, -2.0, -1.0, -0.5]) == "D"
    assert scoring.mmlu_pick([1.0, 1.0, 0.0, 0.0]) == "A"  # tie: first, as torch.argmax


def test_mmlu_categories():
    assert len(scoring.MMLU_SUBCATEGORIES) == 57
    sizes = {}
    for subject in scoring.MMLU_SUBCATEGORIES:
        category = scoring.mmlu_category(subject)
        sizes[category] = sizes.get(category, 0) + 1
    # The standard split: 18 STEM, 13 humanities, 12 social sciences, 14 other subjects.
    assert sizes == {"STEM": 18, "humanities": 13, "social sciences": 12, "other (business, health, misc.)": 14}
    assert scoring.mmlu_category("college_physics") == "STEM"
    assert scoring.mmlu_category("professional_law") == "humanities"
    assert scoring.mmlu_category("econometrics") == "social sciences"
    assert scoring.mmlu_category("virology") == "other (business, health, misc.)"
    assert scoring.mmlu_category("my_custom_subject") == "unknown"


def test_mmlu_summary_micro_average():
    rows = [{"subject": "anatomy", "n": 10, "correct": 10}, {"subject": "college_physics", "n": 30, "correct": 0}]
    summary = scoring.mmlu_summary(rows)
    assert summary["mmlu_average"] == pytest.approx(0.25)  # 10 / 40, not the subject mean 0.5
    assert summary["mmlu_per_category"] == {"STEM": 0.0, "other (business, health, misc.)": 1.0}


def test_mmlu_choice_ids_are_last_token_of_space_letter(tiny_tokenizer):
    ids = scoring.mmlu_choice_token_ids(tiny_tokenizer)
    for letter, token_id in zip("ABCD", ids):
        assert tiny_tokenizer.decode([token_id]).endswith(letter)
    assert len(set(ids)) == 4
