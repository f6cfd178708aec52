"""Command-line plumbing shared by the entry scripts: YAML + flag configuration and one-line user errors.

Configuration the Hugging Face way: ``HfArgumentParser`` dataclasses. A YAML file given as the first positional
argument sets the defaults; flags after it override them (``train.py configs/paper.yaml --learning_rate 5e-5``).
"""

import dataclasses
import os
import sys

import yaml
from transformers import HfArgumentParser


class InputError(ValueError):
    """Bad user input (file, line, option). The entry scripts print it as one line and exit with code 2."""


def parse_config(dataclass_types, argv=None):
    """Parse ``[config.yaml] [--flag value ...]`` into the given dataclasses; YAML keys are checked by name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        config_path = argv.pop(0)
        parser.set_defaults(**load_yaml_config(config_path, dataclass_types))
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # dataclass __post_init__ validation
        raise InputError(str(error)) from None


def load_yaml_config(path, dataclass_types):
    """Read a YAML mapping of option -> value; an unknown key is an error naming the key and the file."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: a config file must be a mapping of option: value")
    known = {field.name for cls in dataclass_types for field in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise InputError(f"{path}: unknown option '{key}' (see --help for the valid names)")
    return values


def run_main(main):
    """Run ``main()``; an InputError becomes one line on stderr and exit code 2, never a traceback."""
    try:
        return main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
