"""Fuzzing the parsers of user input: training configs (dicts and YAML files),
label CSVs (any bytes) and command lines. Whatever comes in, the answer is a
result or a `SoundtagError` with a one-line message, never another exception."""

from __future__ import annotations

import argparse
import dataclasses
import io
import typing
from contextlib import redirect_stderr, redirect_stdout

import yaml
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soundtag import cli, config
from soundtag.config import TrainConfig
from soundtag.datasets.table import Table
from soundtag.errors import ConfigError, SoundtagError



def fuzz(examples: int) -> settings:
    """Bounded, repeatable runs (the same examples every time), no example database."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# names the parsers know, so that examples get past the first check
WORDS = ["cnn6", "cnn10", "vgg", "mobilenetv2", "resnet", "adamw", "sgd", "radam", "onecycle", "cosine",
         "constant", "wrap", "include", "exclude", "own", "logmel", "mfcc", "hann", "mixup", "specaugment",
         "bce", "cross_entropy", "full", "crops", "tiles", "arithmetic", "geometric", "torch", "onnx"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.sampled_from(WORDS),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(WORDS) | st.text(max_size=8), inner, max_size=4), max_leaves=12)


def plausible(hint: typing.Any) -> st.SearchStrategy:
    """Values of a field's type (with odd ones among them), or anything at all."""
    if dataclasses.is_dataclass(hint):
        return options(hint) | values
    by_type = {int: st.integers(-3, 5000) | st.integers(), float: st.floats(-10, 1e5) | st.floats(),
               bool: st.booleans(), str: st.sampled_from(WORDS), type(None): st.none()}
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        inner = plausible(args[0])
    elif typing.get_origin(hint) is dict:
        inner = st.dictionaries(st.sampled_from(["width", "p", "alpha", "dropout", "name"]), values, max_size=3)
    elif args:
        inner = st.one_of(*map(plausible, args))
    else:
        inner = by_type.get(hint, values)
    return (st.lists(inner, max_size=3) if typing.get_origin(hint) is list else inner) | values


def options(cls: type, leave: tuple[str, ...] = ()) -> st.SearchStrategy[dict]:
    """Mappings of (mostly) `cls`'s option names, but those in `leave`, to plausible or arbitrary values."""
    hints = {k: v for k, v in typing.get_type_hints(cls).items() if k not in leave}
    return st.fixed_dictionaries({}, optional={name: plausible(hint) for name, hint in hints.items()}) | \
        st.dictionaries(st.text(max_size=8) | st.integers(), values, max_size=3)


# Options whose values the registered components check (each model's, augmentation's
# and loss's own parameters): only their types are fuzzed, by the from_dict test.
COMPONENTS = ("model", "augment", "loss", "loss_params")


def one_line_error(e: SoundtagError) -> None:
    assert len(str(e).splitlines()) == 1, repr(str(e))


# ---------------------------------------------------------------- configs


@fuzz(150)
@given(data=options(TrainConfig))
def test_config_from_dict_gives_a_config_or_a_one_line_error(data):
    try:
        result = TrainConfig.from_dict(data)
    except SoundtagError as e:
        one_line_error(e)
    else:
        assert isinstance(result, TrainConfig)


@fuzz(60)
@given(data=options(TrainConfig, leave=COMPONENTS))
def test_config_file_over_a_preset_gives_a_validated_config_or_a_one_line_error(data, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        result = config.resolve("fast", path)
    except SoundtagError as e:
        one_line_error(e)
    else:
        assert isinstance(result, TrainConfig)


@fuzz(150)
@given(text=st.text(st.sampled_from("abc:-[]{}&*!|>'\"#%@` \n\t,?.1e"), max_size=60) | st.text(max_size=40))
def test_any_yaml_text_gives_options_or_a_one_line_error(text, tmp_path):
    path = tmp_path / "any.yaml"
    path.write_text(text)
    try:
        assert isinstance(config.load_yaml(path), dict)
    except SoundtagError as e:
        one_line_error(e)


# ---------------------------------------------------------------- label CSVs

csv_text = st.lists(st.lists(st.sampled_from(["fname", "label", "a.wav", "dog", "", " x ", '"q,"', '"', "\r"])
                             | st.text(max_size=6), min_size=1, max_size=4), max_size=5).map(
    lambda rows: "\n".join(",".join(r) for r in rows))


@fuzz(250)
@given(raw=st.binary(max_size=200) | csv_text.map(str.encode) | csv_text.map(lambda t: b"\xef\xbb\xbf" + t.encode()))
def test_any_bytes_as_a_label_csv_give_rows_or_a_one_line_error(raw, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(raw)
    try:
        table = Table(path, [])
    except SoundtagError as e:
        one_line_error(e)
        assert str(e).startswith(str(path))
    else:
        assert table.rows and all(len(row) == len(set(table.columns)) for _, row in table.rows)


# ---------------------------------------------------------------- command lines

PARSER = cli.build_parser()
COMMAND_OPTIONS = {
    name: sorted(a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help")
    for name, parser in PARSER._subparsers._group_actions[0].choices.items()
}
NUMBERS = ["0", "-1", "1", "2", "3", "2.5", "nan", "inf", "-inf", "1e6", "1e400", "600", "601", "0.001",
           "9" * 30, "", "x", "own", "full", "crops", "tiles", "²"]


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMAND_OPTIONS)))
    argv = [command, *draw(st.lists(st.sampled_from(["RUN", "DATA", "a.wav"]), max_size=2))]
    for _ in range(draw(st.integers(0, 5))):
        argv.append(draw(st.sampled_from(COMMAND_OPTIONS[command])))
        argv += draw(st.lists(st.sampled_from(NUMBERS + WORDS) | st.text(max_size=6), max_size=2))
    return argv


def checked(args: argparse.Namespace) -> None:
    """What the commands check before they read data or runs."""
    if args.command == "train":
        config.resolve(args.preset, None, cli.train_overrides(args))
    if hasattr(args, "tta"):
        cli.views_from(args)


@fuzz(80)
@given(argv=command_lines())
def test_any_command_line_parses_or_is_one_error_line(argv):
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            args = PARSER.parse_args(argv)
        checked(args)
    except SystemExit as e:
        assert e.code == 2
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: soundtag"), err.getvalue()
    except SoundtagError as e:
        one_line_error(e)


@pytest.mark.parametrize("overrides", [
    {"model": {"name": "resnet", "params": {"width": None}}},
    {"model": {"name": "resnet", "params": {"layers": []}}},
    {"model": {"name": "cnn10", "params": {"width": []}}},
    {"augment": [{"name": "gain", "p": 0.5, "max_db": [1]}]},
    {"threads": -1},
])
def test_component_parameters_of_the_wrong_kind_are_one_line_errors(overrides):
    with pytest.raises(ConfigError) as e:
        config.resolve("fast", overrides=overrides)
    assert "\n" not in str(e.value)
