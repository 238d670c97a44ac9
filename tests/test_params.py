import dataclasses
from typing import Literal

import pytest

from saebench.metrics.core import CoreParams
from saebench.metrics.probes import ProbesParams
from saebench.metrics.registry import get_metric, metric_names
from saebench.params import build, convert, describe_fields, field_docs, parse_assignments
from saebench.runner import make_params
from saebench.train.config import TrainConfig


@dataclasses.dataclass
class Example:
    """A config with one field of every supported kind."""

    #: a switch
    flag: bool = True
    #: a count
    count: int = 3
    #: a rate
    rate: float = 0.5
    #: a word
    word: str = "abc"
    #: a count or nothing
    maybe_count: int | None = None
    #: a rate or nothing
    maybe_rate: float | None = 1.0
    #: a choice
    mode: Literal["fast", "exact"] = "fast"
    name: str = "x"
    """Documented below, sparsify style,
    over two lines."""


READS = [
    ("flag", "false", False),
    ("flag", "False", False),
    ("flag", "0", False),
    ("flag", "no", False),
    ("flag", "OFF", False),
    ("flag", "true", True),
    ("flag", "1", True),
    ("flag", "Yes", True),
    ("flag", "on", True),
    ("count", "7", 7),
    ("count", "-2", -2),
    ("count", "1_000", 1000),
    ("count", "1e6", 1_000_000),
    ("rate", "1e-3", 1e-3),
    ("rate", "2", 2.0),
    ("rate", ".25", 0.25),
    ("word", "none", "none"),
    ("word", " spaced ", " spaced "),
    ("word", "", ""),
    ("maybe_count", "none", None),
    ("maybe_count", "None", None),
    ("maybe_count", "12", 12),
    ("maybe_rate", "NONE", None),
    ("maybe_rate", "3e-4", 3e-4),
    ("mode", "exact", "exact"),
]


@pytest.mark.parametrize(("name", "text", "expected"), READS)
def test_values_are_read_by_the_declared_type(name, text, expected):
    value = convert(Example, {name: text}, flag="--param")[name]
    assert value == expected and type(value) is type(expected)


BAD = [
    ("flag", "maybe", "expected a boolean (true/false, yes/no, on/off, 1/0)"),
    ("flag", "2", "expected a boolean"),
    ("flag", "", "expected a boolean"),
    ("count", "2.5", "expected an integer"),
    ("count", "ten", "expected an integer"),
    ("count", "none", "expected an integer"),
    ("rate", "abc", "expected a float"),
    ("rate", "nan", "expected a float"),
    ("rate", "inf", "expected a float"),
    ("maybe_count", "1.5", "expected an integer or none"),
    ("maybe_rate", "x", "expected a float or none"),
    ("mode", "slow", "expected one of 'fast', 'exact'"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD)
def test_unreadable_values_are_one_line_errors_naming_flag_item_and_type(name, text, message):
    with pytest.raises(ValueError) as err:
        convert(Example, {name: text}, flag="--param", prefix="example.")
    assert str(err.value).startswith(f"bad --param 'example.{name}={text}': {message}")
    assert "\n" not in str(err.value)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError) as err:
        parse_assignments(Example, ["cuont=3"], flag="--set")
    message = str(err.value)
    assert message.startswith("bad --set 'cuont=3': Example has no parameter 'cuont' (did you mean 'count'?)")
    assert "it has: flag, count, rate, word, maybe_count, maybe_rate, mode, name" in message
    with pytest.raises(ValueError, match="bad --set 'count': use NAME=VALUE"):
        parse_assignments(Example, ["count"], flag="--set")


def test_assignments_split_at_the_first_equals_and_the_last_one_wins():
    assert parse_assignments(Example, ["word=a=b", "count=1", "count=2"], flag="--set") == {
        "word": "a=b",
        "count": 2,
    }


def test_python_values_are_checked_and_ints_become_floats():
    assert convert(Example, {"rate": 1, "maybe_rate": None, "flag": False}, flag="--param") == {
        "rate": 1.0,
        "maybe_rate": None,
        "flag": False,
    }
    assert type(convert(Example, {"rate": 1}, flag="--param")["rate"]) is float
    for name, value in (("count", True), ("count", 1.5), ("flag", 1), ("word", 3)):
        with pytest.raises(ValueError, match=f"bad --param '{name}={value!r}': expected"):
            convert(Example, {name: value}, flag="--param")


def test_field_docs_read_comments_above_and_docstrings_below():
    docs = field_docs(Example)
    assert docs["flag"] == "a switch" and docs["maybe_rate"] == "a rate or nothing"
    assert docs["name"] == "Documented below, sparsify style, over two lines."
    probes = field_docs(ProbesParams)
    assert probes["fit_dtype"].startswith("precision of the logistic fits: float32 agrees")
    assert probes["fit_dtype"].endswith("and is twice as fast; float64 for reference")
    assert set(field_docs(TrainConfig)) == {f.name for f in dataclasses.fields(TrainConfig)}
    for name in metric_names():
        params = get_metric(name).params
        assert set(field_docs(params)) == {f.name for f in dataclasses.fields(params)}, name


def test_describe_fields_gives_type_default_and_doc():
    text = describe_fields(Example)
    assert "  maybe_count: int | None = None\n      a count or nothing" in text
    assert "  mode: {fast, exact} = 'fast'" in text
    assert "  dead_tokens: int = 10_000_000\n" in describe_fields(TrainConfig)


def test_metric_parameters_keep_their_defaults_and_validate():
    assert dataclasses.asdict(CoreParams()) == {"dense_threshold": 0.1}
    assert dataclasses.asdict(ProbesParams()) == {
        "tasks": "all",
        "include_tasks": "",
        "l2": 1e-3,
        "tol": 1e-8,
        "max_iter": 50,
        "fit_dtype": "float32",
        "chunk_tokens": 1024,
    }
    for cls, values, message in (
        (CoreParams, {"dense_threshold": 0.0}, r"core: dense_threshold is a fraction in \(0, 1\]"),
        (CoreParams, {"dense_threshold": 1.5}, "dense_threshold"),
        (ProbesParams, {"fit_dtype": "float16"}, "fit_dtype must be one of float32, float64"),
        (ProbesParams, {"l2": -1.0}, "l2 is a penalty weight and must be >= 0"),
        (ProbesParams, {"tol": 0.0}, "tol must be positive"),
        (ProbesParams, {"max_iter": 0}, "max_iter must be >= 1"),
        (ProbesParams, {"chunk_tokens": 0}, "chunk_tokens must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            cls(**values)
    assert ProbesParams(l2=0.0).l2 == 0.0 and CoreParams(dense_threshold=1.0).dense_threshold == 1.0


def test_make_params_reads_text_like_the_command_line():
    probes = make_params(get_metric("probes"), {"l2": "1e-2", "max_iter": "7", "tasks": "code"})
    assert (probes.l2, probes.max_iter, probes.tasks) == (1e-2, 7, "code")
    assert make_params(get_metric("core"), {}) == CoreParams()
    with pytest.raises(ValueError, match=r"bad --param 'probes.l2=abc': expected a float"):
        make_params(get_metric("probes"), {"l2": "abc"})
    with pytest.raises(ValueError, match="metric 'downstream' has no parameter 'x'; it has: none"):
        make_params(get_metric("downstream"), {"x": "1"})


def test_train_config_validates_its_fields():
    for values, message in (
        ({"lr": 0.0}, "lr must be positive"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"n_latents": 64, "k": 65}, "k <= n_latents"),
        ({"activation": "relu", "n_latents": 64, "k": 65}, "k <= n_latents"),
        ({"activation": "gelu"}, "unknown activation"),
        ({"adam_beta2": 1.0}, "betas"),
        ({"auxk_alpha": -0.1}, "auxk_alpha must be >= 0"),
        ({"k_aux": 0}, "k_aux must be positive"),
        ({"l1_coefficient": -1.0}, "l1_coefficient"),
        ({"l1_target_l0": 0.0}, "l1_target_l0 must be positive"),
        ({"log_every": 0}, "log_every must be positive"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
        ({"geometric_median_tokens": 0}, "geometric_median_tokens must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**values)
    TrainConfig(checkpoint_every=0, max_tokens=0, auxk_alpha=0.0)  # the documented "off" values


def test_train_overrides_are_typed():
    overrides = parse_assignments(
        TrainConfig,
        ["multi_topk=false", "tied_init=off", "lr=3e-4", "k_aux=none", "dead_tokens=1e6", "device=cuda:1"],
        flag="--set",
    )
    assert overrides == {
        "multi_topk": False,
        "tied_init": False,
        "lr": 3e-4,
        "k_aux": None,
        "dead_tokens": 1_000_000,
        "device": "cuda:1",
    }
    assert build(TrainConfig, overrides, flag="--set").tied_init is False
