"""Command-line plumbing shared by the entry scripts: YAML + flag configuration and one-line user errors.

Configuration the Hugging Face way: ``HfArgumentParser`` dataclasses. A YAML file given as the first positional
argument sets the defaults; flags after it override them (``train.py configs/paper.yaml --learning_rate 5e-5``).
"""

import argparse
import dataclasses
import logging
import os
import re
import sys

import yaml
from transformers import HfArgumentParser


# Third-party log records that are expected here and would bury the one-line errors and run headers:
# (logger name, message start). Filters on a logger hold from before the module that logs is imported.
KNOWN_NOISE = (
    # bitsandbytes logs this at import on CPUs with AVX512-BF16 when the optional `kernels` package (which fetches
    # a kernel from the hub) is absent; it then uses its own CPU kernels
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # and this on every 8-bit matmul of a non-fp16 input (bf16 on GPUs, eval mode on CPU): expected, it would flood
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
)


def silence_known_noise():
    for name, start in KNOWN_NOISE:
        logging.getLogger(name).addFilter(lambda record, start=start: not record.getMessage().startswith(start))


silence_known_noise()  # every entry script imports this module before anything that imports bitsandbytes


class InputError(ValueError):
    """Bad user input (file, line, option). The entry scripts print it as one line and exit with code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the script's docstring as written (its example commands keep their lines), and each option's
    default unless it is empty."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(" not in text:
            text = text.replace("%", "%%")  # argparse %-formats help: "Min-K%" would crash --help
        if action.default in ("", None) or action.default is argparse.SUPPRESS or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


def make_parser(dataclass_types, description=None, groups=None, usage=None):
    """The HfArgumentParser of a script: ``description`` (its docstring) on top, the YAML preset in the usage line,
    and the options in ``groups`` ({title: [option names]}, every option in one) instead of one flat list."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else None
    parser = HfArgumentParser(dataclass_types, prog=prog, usage=usage or "%(prog)s [PRESET.yaml] [--option value ...]",
                              description=description,
                              formatter_class=HelpFormatter,
                              epilog="PRESET.yaml (configs/*.yaml, or a run's train_config.yaml) sets the defaults; "
                                     "flags after it override them.")
    if groups:
        actions = {}  # dest -> its actions (a bool option also has its --no_ form)
        for action in parser._actions:
            actions.setdefault(action.dest, []).append(action)
        listed = [name for names in groups.values() for name in names]
        options = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)}
        if sorted(listed) != sorted(options):  # a programming error: an option added without a group
            raise AssertionError(f"help groups differ from the options: {sorted(set(listed) ^ options)}")
        for title, names in groups.items():
            group = parser.add_argument_group(title)
            for action in (action for name in names for action in actions[name]):
                for other in parser._action_groups:
                    if action in other._group_actions and other is not group:
                        other._group_actions.remove(action)
                group._group_actions.append(action)
        parser._action_groups = [g for g in parser._action_groups if g._group_actions]
    return parser


def parse_config(dataclass_types, argv=None, description=None, groups=None, usage=None):
    """Parse ``[config.yaml] [--flag value ...]`` into the given dataclasses; YAML keys are checked by name.
    ``description``, ``groups``, ``usage``: how --help presents them (make_parser)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(dataclass_types, description, groups, usage)
    parser.error = _argparse_error  # a bad flag value is one line, not the whole usage text
    if preset_path(argv):
        config_path = argv.pop(0)
        values = load_yaml_config(config_path, dataclass_types)
        parser.set_defaults(**{key: _yaml_value(parser, config_path, key, value) for key, value in values.items()})
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                              return_remaining_strings=True)
    except ValueError as error:  # dataclass __post_init__ validation
        raise InputError(str(error)) from None
    if unknown:
        raise InputError(f"unknown option or stray value: {' '.join(unknown)} (see --help for the valid options)")
    return tuple(parsed)


def preset_path(argv):
    """The YAML preset given as the first positional argument, or ''."""
    return argv[0] if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-") else ""


# the top-level keys of a train_config.yaml that train.py writes: its "config" mapping is a preset again
RUN_RECORD_KEYS = {"config", "result", "launch", "provenance"}
# options of a recorded run that belong to that run, not to its configuration
RUN_SPECIFIC_OPTIONS = ("resume_from_checkpoint", "overwrite_output_dir")


def _argparse_error(message):
    # argparse's "argument --x/--x-y: invalid choice: 'v' (choose from 'a', 'b')" in this project's form
    choice = re.match(r"argument (--\w+)(?:/\S+)?: invalid choice: '(.*)' \(choose from (.*)\)$", message)
    if choice:
        flag, value, allowed = choice.groups()
        message = f"{flag} {value}: expected one of {allowed.replace(chr(39), '')}"
    raise InputError(f"{message} (see --help)")


def _yaml_value(parser, path, key, value):
    """Parse a YAML value as the flag ``--key`` would parse it, so a wrong type fails now, naming the file."""
    if value is None:
        return value
    if isinstance(value, (list, dict)):
        raise InputError(f"{path}: option '{key}' must be a single value, not a {type(value).__name__}")
    action = next((a for a in parser._actions if a.dest == key and a.type is not None), None)
    if action is None:
        return value
    try:
        converted = action.type(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        expected = {int: "an integer", float: "a number", str: "a string"}.get(action.type) or \
            ("true or false" if getattr(action.type, "__name__", "") == "string_to_bool" else "a valid value")
        raise InputError(f"{path}: option '{key}' must be {expected}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise InputError(f"{path}: option '{key}' must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted


def load_yaml_config(path, dataclass_types):
    """Read a YAML mapping of option -> value; an unknown key is an error naming the key and the file."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: config file not found; check the path")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InputError(f"{where}: not valid YAML ({problem}); expected lines of option: value") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: a config file must be a mapping of option: value")
    if isinstance(values.get("config"), dict) and set(values) <= RUN_RECORD_KEYS:
        # a finished run's train_config.yaml: rerun its configuration (a new run: not its resume state)
        values = {k: v for k, v in values["config"].items() if k not in RUN_SPECIFIC_OPTIONS}
    known = {field.name for cls in dataclass_types for field in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise InputError(f"{path}: unknown option '{key}' (see --help for the valid names)")
    return values


def check_choices(options):
    """Every field of the options dataclass ``options`` declared with ``metadata["choices"]`` holds one of them. The
    one check of an enumerated option: argparse applies the same choices to flags and _yaml_value to presets; each
    dataclass's __post_init__ calls this, so options built in Python are checked too."""
    for option in dataclasses.fields(options):
        choices, value = option.metadata.get("choices"), getattr(options, option.name)
        if choices is not None and value not in choices:
            raise ValueError(f"--{option.name} {value}: expected one of {', '.join(map(str, choices))}")


def check_quantization(flag, lora_r, zero_stage):
    """The refusals of a quantized base (``flag``: the option that asked for it), the same in train.py and
    plan_memory.py: it needs LoRA, and ZeRO-3 cannot shard it."""
    if lora_r == 0:
        raise InputError(f"{flag}: a quantized base needs LoRA (quantized weights cannot be trained): set --lora_r > 0 "
                         f"or drop {flag}")
    if zero_stage == 3:
        raise InputError(f"{flag} with DeepSpeed ZeRO-3: ZeRO-3 shards every weight and cannot shard bitsandbytes' "
                         f"quantized ones; use ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml) or DDP "
                         f"(multi_gpu.yaml), or drop {flag}")


def exit_process(code=0):
    """End an entry script: flush, then exit with ``code``; after a multi-process run without Python's exit
    handlers (os._exit), where torch 2.13's gloo backend sometimes aborts."""
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code or 0)
    sys.exit(code)


def run_main(main):
    """Run ``main()``; an InputError becomes one line on stderr and exit code 2, Ctrl-C one line and exit code 130,
    never a traceback."""
    try:
        return main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): stopped without saving", file=sys.stderr)
        sys.exit(130)
