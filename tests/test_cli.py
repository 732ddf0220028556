"""One set of conventions across the scripts: defaults and closed choices in every --help, the same
flag name for the same thing (old spellings kept as aliases)."""
import argparse
import importlib

import pytest

SCRIPTS = ("train", "validation", "reproduce", "report", "predict", "demo", "study", "bench", "prepare")


def parsers():
    for name in SCRIPTS:
        parser = importlib.import_module(name).get_args_parser()
        yield name, parser
        for action in parser._actions:                     # prepare.py's sub-commands
            if isinstance(action, argparse._SubParsersAction):
                yield from ((f"{name} {sub}", p) for sub, p in action.choices.items())


@pytest.mark.parametrize("name, parser", list(parsers()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_help_shows_each_default_and_the_choices(name, parser):
    text = parser.format_help()
    assert parser.allow_abbrev is False, name
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.default in (None, argparse.SUPPRESS):
            continue
        helped = parser._get_formatter()._get_help_string(action) or ""
        assert "default" in helped.lower(), (name, action.option_strings)
    for flag in ("--device", "--optimizer", "--augment", "--precision", "--select"):
        action = next((a for a in parser._actions if flag in a.option_strings), None)
        if action is not None:
            assert action.choices, (name, flag)
            assert "{" + ",".join(action.choices) + "}" in text, (name, flag)


def test_a_closed_choice_is_refused_when_parsed(capsys):
    train = importlib.import_module("train").get_args_parser()
    for flag, bad in (("--device", "gpu"), ("--optimizer", "rmsprop"), ("--augment", "heavy")):
        with pytest.raises(SystemExit):
            train.parse_args([flag, bad])
        assert f"argument {flag}: invalid choice: '{bad}'" in capsys.readouterr().err


@pytest.mark.parametrize("script, old, new, dest", [
    ("reproduce", "--variants", "--methods", "variants"),
    ("study", "--methods", "--variants", "methods"),
    ("reproduce", "--eval_precision", "--precision", "eval_precision"),
    ("validation", "--model_root", "--save_root", "model_root"),
    ("bench", "--work_dir", "--save_root", "work_dir"),
])
def test_the_same_thing_has_the_same_flag_with_the_old_spelling_kept(script, old, new, dest):
    parser = importlib.import_module(script).get_args_parser()
    required = {"reproduce": ["--train_data_root", "t", "--classes", "a", "b"],
                "validation": ["--test_data_root", "t"]}.get(script, [])
    value = {"eval_precision": "bf16"}.get(dest, "x")
    a = vars(parser.parse_args(required + [old, value]))[dest]
    b = vars(parser.parse_args(required + [new, value]))[dest]
    assert a == b and (a == value or a == [value])
