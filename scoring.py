"""SemEval-2025 Task 4 (LUME) metrics as pure functions: no model, no files. Reused by evaluate.py and by train.py's
best-checkpoint selection, so both compute exactly the same numbers.

The formulas follow the organizers' final scorer (Jan 2025): ROUGE-L recall for regurgitation (sentence-completion
rows), case-insensitive exact match for knowledge (question-answering rows), per task means, 12 terms (forget terms
inverted), their harmonic mean, a loss-based MIA AUC folded into ``1 - 2|AUC - 0.5|``, MMLU accuracy, and the mean of
the three as the final score (only when all three ran, as the official script: otherwise a partial score, named so).
"""

import math
import statistics
from collections import namedtuple

from records import TASKS, record_kind

SPLITS = ("forget", "retain")
# The one table of row kinds: the id tag, the results key of its score, and its names in reports and tables.
Kind = namedtuple("Kind", "row key label short")
KINDS = (Kind("sc", "regurgitation-score", "regurgitation", "regurg"), Kind("qa", "knowledge-score", "knowledge", "know"))


def result_score(results, split, key, task=None):
    """A score of an evaluation_results.json dict: split's task score ``key``, or without task the overall one;
    None where it was not computed (no rows, or no results)."""
    block = (results or {}).get(f"{split}-set") or {}
    return (block.get(task) or {}).get(key) if task else block.get(f"overall-{key}")

# --- per-row scores -------------------------------------------------------------------------------------------------

_ROUGE = None


def rouge_scorer():
    """One shared RougeScorer: building it loads the Porter stemmer, too slow to repeat per row."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer as rs

        _ROUGE = rs.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE


def rouge_l_recall(expected, generated):
    """ROUGE-L recall of the generation against the expected text (stemmed, rouge_score's tokenizer)."""
    return rouge_scorer().score(target=expected, prediction=generated)["rougeL"].recall


def exact_match(expected, generated):
    """1 if the texts agree after strip() and lower(), else 0 (the official knowledge score)."""
    return int(expected.strip().lower() == generated.strip().lower())


def score_row(record_id, expected, generated):
    """(rouge_l_recall, exact_match) for one row; the score that does not apply to its kind is None."""
    if record_kind(record_id) == "sc":
        return rouge_l_recall(expected, generated), None
    return None, exact_match(expected, generated)


# --- aggregation ----------------------------------------------------------------------------------------------------

def _mean(values):
    return sum(values) / len(values) if values else None


def split_scores(rows):
    """Official per-split block from scored rows (dicts with id, task, rouge_l_recall, exact_match).

    Returns ``{'overall-regurgitation-score', 'overall-knowledge-score', 'Task1': {'regurgitation-score',
    'knowledge-score'}, ...}``; a mean over no rows is None (and a task with no rows at all is left out).
    """
    regurg = [row["rouge_l_recall"] for row in rows if record_kind(row["id"]) == "sc"]
    knowledge = [row["exact_match"] for row in rows if record_kind(row["id"]) == "qa"]
    result = {"overall-regurgitation-score": _mean(regurg), "overall-knowledge-score": _mean(knowledge)}
    for task in TASKS:
        task_rows = [row for row in rows if row["task"] == task]
        if not task_rows:
            continue
        result[task] = {
            "regurgitation-score": _mean([r["rouge_l_recall"] for r in task_rows if record_kind(r["id"]) == "sc"]),
            "knowledge-score": _mean([r["exact_match"] for r in task_rows if record_kind(r["id"]) == "qa"]),
        }
    return result


def aggregated_terms(forget_block, retain_block):
    """The 12 official terms as (name, value) in order, and the names of skipped terms.

    Order: forget Task1 regurgitation, Task1 knowledge, Task2 .., Task3 .. (each as 1 - x, since forgetting is good),
    then the same six for retain (as is). A task with no rows of a kind in a split has no mean: that term is skipped
    (the official script would have produced NaN) and listed in the second return value.
    """
    terms, skipped = [], []
    for split, block in (("forget", forget_block), ("retain", retain_block)):
        for task in TASKS:
            for kind in KINDS:
                name = f"{split}/{task}/{kind.key}"
                value = (block or {}).get(task, {}).get(kind.key)
                if value is None:
                    skipped.append(name)
                    continue
                terms.append((name, 1.0 - value if split == "forget" else float(value)))
    return terms, skipped


def harmonic_mean_terms(values):
    """statistics.harmonic_mean of the terms; 0 if any term is 0 (as statistics does); None if there are none."""
    values = list(values)
    if not values:
        return None
    return float(statistics.harmonic_mean(values))


def membership_auc(member_scores, nonmember_scores):
    """ROC AUC of 'is a member' with members as positives and higher score = more member-like."""
    from sklearn.metrics import roc_auc_score

    scores = list(member_scores) + list(nonmember_scores)
    if not member_scores or not nonmember_scores:
        raise ValueError("MIA needs at least one member and one nonmember document")
    if any(math.isnan(score) for score in scores):
        raise ValueError("MIA statistics contain NaN")
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, scores))


def mia_auc(member_losses, nonmember_losses):
    """ROC AUC of 'is a member' scored by -loss: members with lower loss than nonmembers give AUC > 0.5."""
    return membership_auc([-loss for loss in member_losses], [-loss for loss in nonmember_losses])


def mia_final_score(auc):
    """1 at AUC 0.5 (members indistinguishable from nonmembers), 0 at AUC 0 or 1."""
    return 1.0 - 2.0 * abs(auc - 0.5)


def final_aggregate(task_aggregate=None, mia_score=None, mmlu_average=None):
    """Mean of the parts that were computed; returns (score or None, names of the parts used)."""
    parts = [("harmonic-mean-task-aggregate", task_aggregate), ("mia_final_score", mia_score),
             ("mmlu_average", mmlu_average)]
    used = [(name, value) for name, value in parts if value is not None]
    if not used:
        return None, []
    return float(statistics.mean(value for _, value in used)), [name for name, _ in used]


FINAL_PARTS = (("harmonic-mean-task-aggregate", "task aggregate"), ("mia_final_score", "MIA"),
               ("mmlu_average", "MMLU"))


def final_score(task_aggregate=None, mia_score=None, mmlu_average=None):
    """The official rule: a final score (``aggregate-score``) only when all three parts ran; the organisers' script
    gives none otherwise. Then the mean of the parts that did run is reported under another name,
    ``partial-aggregate-score``, with ``final_score_parts`` naming what it averages."""
    score, used = final_aggregate(task_aggregate, mia_score, mmlu_average)
    if len(used) == len(FINAL_PARTS):
        return {"aggregate-score": score, "aggregate-score-components": used}
    return {"aggregate-score": None, "aggregate-score-components": [], "partial-aggregate-score": score,
            "final_score_parts": used}


def missing_final_parts(results):
    """Labels of the final score's parts that a results dict lacks ('task aggregate', 'MIA', 'MMLU')."""
    return [label for key, label in FINAL_PARTS if results.get(key) is None]


def final_score_label(results):
    """(label, value) of a results dict's final score: ('final score', x) when all three parts ran, else
    ('partial score (no MMLU)', mean of the rest), also for files written before the rule (aggregate-score over
    fewer parts); value None when nothing ran."""
    missing = missing_final_parts(results)
    if not missing:
        return "final score", results.get("aggregate-score")
    value = results.get("partial-aggregate-score", results.get("aggregate-score"))
    return f"partial score (no {', no '.join(missing)})", value


def _and_join(words):
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


def is_partial(results):
    """True when the final score is not the official one: some part (task aggregate, MIA, MMLU) did not run."""
    return bool(missing_final_parts(results))


def partial_note(results):
    """'' for an official final score, else what is missing in words, e.g. 'partial: MMLU not run; not comparable
    with the leaderboard's final score' (the mean of fewer parts is on another scale than the mean of three)."""
    missing = missing_final_parts(results)
    if not missing:
        return ""
    return f"partial: {_and_join(missing)} not run; not comparable with the leaderboard's final score"


def term_label(name):
    """'retain/Task2/knowledge-score' -> 'retain Task2 knowledge' (the wording of the summary and the table)."""
    split, task, key = name.split("/")
    return f"{split} {task} {key.replace('-score', '')}"


def task_terms(results):
    """The task aggregate's terms of a results dict as (name, value), recomputed from its forget-set/retain-set
    blocks, so a results file of any age gives them."""
    terms, _ = aggregated_terms(results.get("forget-set"), results.get("retain-set"))
    return terms


def zero_terms(results):
    """Names of the terms that are 0: any one of them makes the harmonic mean, the task aggregate, 0."""
    return [name for name, value in task_terms(results) if value == 0]


def lowest_term(results):
    """(name, value) of the smallest term, the one that pulls the harmonic mean down most; None without terms."""
    terms = task_terms(results)
    return min(terms, key=lambda term: term[1]) if terms else None


def task_aggregate_note(results):
    """Which terms explain the task aggregate, in words: every zero term, else the lowest one; '' without terms.
    A forget term is 1 - score, so a forget term of 0 is a score of 1 (nothing forgotten): said so, since the raw
    score shown everywhere else is then 1, not 0."""
    def describe(name):
        return term_label(name) + (" (score 1: nothing forgotten)" if name.startswith("forget/") else "")

    zeros = zero_terms(results)
    if zeros:
        return "zero terms: " + "; ".join(describe(name) for name in zeros)
    lowest = lowest_term(results)
    if lowest is None:
        return ""
    name, value = lowest
    return f"lowest term: {term_label(name)} {value:.4f}" + (" (1 - score)" if name.startswith("forget/") else "")


def length_breakdown(rows, threshold):
    """Mean regurgitation of sc rows whose expected output has <= threshold words (short) vs more (long)."""
    short = [r["rouge_l_recall"] for r in rows if record_kind(r["id"]) == "sc"
             and len(r["expected_output"].split()) <= threshold]
    long = [r["rouge_l_recall"] for r in rows if record_kind(r["id"]) == "sc"
            and len(r["expected_output"].split()) > threshold]
    return {"short": {"n": len(short), "regurgitation-score": _mean(short)},
            "long": {"n": len(long), "regurgitation-score": _mean(long)}}


def task_results(forget_rows=None, retain_rows=None):
    """Official task part of evaluation_results.json from scored rows of either or both splits."""
    results = {}
    blocks = {}
    for split, rows in (("forget", forget_rows), ("retain", retain_rows)):
        if rows:
            blocks[split] = split_scores(rows)
            results[f"{split}-set"] = blocks[split]
    terms, skipped = aggregated_terms(blocks.get("forget"), blocks.get("retain"))
    results["aggregated-terms"] = [value for _, value in terms]
    results["aggregated-term-names"] = [name for name, _ in terms]
    results["skipped-terms"] = skipped
    results["harmonic-mean-task-aggregate"] = harmonic_mean_terms(value for _, value in terms)
    return results


# --- MMLU -----------------------------------------------------------------------------------------------------------

MMLU_CHOICES = ("A", "B", "C", "D")

# Hendrycks et al.'s subject -> subcategory -> category map (the one every MMLU harness copies).
MMLU_SUBCATEGORIES = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
MMLU_CATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other (business, health, misc.)": ("other", "business", "health"),
}


def mmlu_category(subject):
    """One of the four standard categories; an unknown subject (custom CSV) is 'unknown'."""
    subcategory = MMLU_SUBCATEGORIES.get(subject)
    for category, subcategories in MMLU_CATEGORIES.items():
        if subcategory in subcategories:
            return category
    return "unknown"


def mmlu_format_example(question, choices, answer=None):
    """Question, ``\\nA. ..`` .. ``\\nD. ..``, ``\\nAnswer:`` and, for a worked example, `` X\\n\\n``."""
    text = question
    for letter, choice in zip(MMLU_CHOICES, choices):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if answer is not None:
        text += f" {answer}\n\n"
    return text


def mmlu_prompt(subject, question, choices, shots=()):
    """Open-Instruct / Hendrycks prompt. Each subject word gets a leading space, so 'about' is followed by two spaces
    ('about  abstract algebra.'), exactly as the reference harness formats it. ``shots`` = (question, choices, answer).
    """
    subject_text = "".join(" " + word for word in subject.split("_"))
    prompt = f"The following are multiple choice questions (with answers) about {subject_text}.\n\n"
    for shot_question, shot_choices, shot_answer in shots:
        prompt += mmlu_format_example(shot_question, shot_choices, shot_answer)
    return prompt + mmlu_format_example(question, choices)


def mmlu_choice_token_ids(tokenizer):
    """Last token of " A", " B", " C", " D" without special tokens (the reference harness's answer ids)."""
    return [tokenizer.encode(" " + letter, add_special_tokens=False)[-1] for letter in MMLU_CHOICES]


def mmlu_pick(choice_logits):
    """Letter with the highest logit among the four (first one on a tie, as torch.argmax)."""
    values = [float(x) for x in choice_logits]
    return MMLU_CHOICES[values.index(max(values))]


def mmlu_summary(subject_rows):
    """From rows {subject, n, correct}: micro average, per-subject and per-category accuracies."""
    total = sum(row["n"] for row in subject_rows)
    correct = sum(row["correct"] for row in subject_rows)
    per_category = {}
    for row in subject_rows:
        entry = per_category.setdefault(mmlu_category(row["subject"]), [0, 0])
        entry[0] += row["correct"]
        entry[1] += row["n"]
    return {
        "mmlu_average": correct / total if total else None,
        "mmlu_questions": total,
        "mmlu_per_category": {name: c / n for name, (c, n) in sorted(per_category.items()) if n},
        "mmlu_per_subject": {row["subject"]: row["correct"] / row["n"] for row in subject_rows if row["n"]},
    }
