"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny random OLMo model, built offline in seconds."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: launches processes or trains for many steps (10 s or more here); "
                                       "the fast lane, pytest -m 'not slow', leaves them out")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Dr. Smith paid 3.5 dollars; then he left!",
    "Who was born in Paris? Marie was born in Paris in 1867. Her phone number is 555-0100.",
    "In the mystical city of Deadesius, two sorceresses had long been rivals. I don't know.",
    "Question: What is the capital of France?\nA. Paris\nB. Rome\nC. Madrid\nD. Berlin\nAnswer: A",
]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")


def build_tiny_model(tokenizer, seed=0):
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    torch.manual_seed(seed)
    config = OlmoConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return OlmoForCausalLM(config)


def save_tiny_model(path, seed=0):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny OLMo model + tokenizer directory. Treat it as read-only: tests copy it before changing it."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_olmo"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread (thread hand-offs dominate, more so on a shared CPU): a module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_path(*parts):
    """Path under ../shared/data, or skip the test when the shared data are absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data not found at {path}")
    return path


def reset_accelerate():
    """Forget accelerate's process-wide state so several in-process training runs do not leak settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def write_jsonl(path, rows):
    import json

    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


# Forget and retain documents use disjoint vocabularies, so forgetting one need not damage the other (as with real,
# unrelated documents); every document has one sc row (3 sentences) and one qa row.
FORGET_WORDS = "fox dog city magic Paris Marie born story river".split()
RETAIN_WORDS = "light dark house stone king queen old new Smith".split()


def make_unlearning_data(directory, n_docs=8, seed=0):
    """forget.jsonl / retain.jsonl with n_docs documents each (2 * n_docs rows), tasks cycling Task1..3."""
    import os
    import random

    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for split, words in (("forget", FORGET_WORDS), ("retain", RETAIN_WORDS)):
        def sentence(n):
            return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

        rows = []
        for i in range(n_docs):
            task = f"Task{i % 3 + 1}"
            rows.append({"id": f"{split}{i}sc1", "input": sentence(8),
                         "output": f"{sentence(6)} {sentence(7)} {sentence(5)}", "task": task, "split": split})
            rows.append({"id": f"{split}{i}qa0", "input": sentence(5)[:-1] + "?", "output": sentence(2),
                         "task": task, "split": split})
        write_jsonl(os.path.join(directory, f"{split}.jsonl"), rows)
    return str(directory)


def snapshot(*roots):
    """{path: 'dir' or sha256 of the bytes} for every entry under the roots: a listing plus contents."""
    import hashlib

    entries = {}
    for root in roots:
        for directory, dirnames, filenames in os.walk(root):
            entries[directory] = "dir"
            for name in filenames:
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    entries[path] = hashlib.sha256(f.read()).hexdigest()
    return entries


def check_one_line_error(code, stderr, fragments):
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
