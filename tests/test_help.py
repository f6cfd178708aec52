"""--help of every entry script: it works (evaluate.py's once crashed on a '%' in a help text), starts with the
script's docstring, shows the preset in the usage line, and train.py groups its options and shows choices."""

import importlib

import pytest

import train

SCRIPTS = ("train", "evaluate", "demo", "compare", "merge_adapters", "plan_memory", "prepare_model", "augment")


def help_text(module_name, capsys):
    module = importlib.import_module(module_name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    return module, capsys.readouterr().out


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_starts_with_the_docstring_and_shows_the_preset(name, capsys):
    module, text = help_text(name, capsys)
    usage, rest = text.split("\n", 1)
    assert usage.startswith("usage: ") and "--option value" in usage
    assert ("EVAL_DIR" in usage) if name == "compare" else ("[PRESET.yaml]" in usage)
    assert module.__doc__.strip().splitlines()[0] in rest
    assert "(default: )" not in text


def test_train_help_groups_options_and_shows_choices(capsys):
    _, text = help_text("train", capsys)
    for title in train.HELP_GROUPS:
        assert f"\n{title}:\n" in text, title
    assert "{gi,gi2,ga,ntp,npo,none}" in text and "{linear,cosine," in text
    # each option under its own group's heading: --lora_target_modules between "LoRA:" and the next heading
    lora = text.split("\nLoRA:\n", 1)[1].split("\n\n", 1)[0]
    assert "--lora_target_modules" in lora and "--no_merge_lora" in lora and "--learning_rate" not in lora


def test_a_wrong_choice_is_one_line_in_the_projects_form(tmp_path, capsys):
    from cli import InputError

    with pytest.raises(InputError, match=r"^--forget_loss bogus: expected one of gi, gi2, ga, ntp, npo, none "):
        train.parse_arguments(["--forget_loss", "bogus", "--output_dir", str(tmp_path)])
