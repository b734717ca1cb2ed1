"""Configuration strings: parsing, defaults, flags and the errors for bad parts."""

import pytest

from parity.config import Configuration, default_referee, parse_config, parse_configs
from parity.errors import ConfigError, ParityError


@pytest.mark.parametrize(
    "text, backend, device, index, mode, precision",
    [
        ("tensorflow:cpu:graph:float32", "tensorflow", "cpu", None, "graph", "float32"),
        ("tensorflow:cpu:xla:float32", "tensorflow", "cpu", None, "xla", "float32"),
        ("jax:cpu:jit:float32", "jax", "cpu", None, "jit", "float32"),
        ("torch:cpu:eager:float32", "torch", "cpu", None, "eager", "float32"),
        (
            "torch:cuda:0:eager:mixed_bfloat16",
            "torch",
            "cuda",
            0,
            "eager",
            "mixed_bfloat16",
        ),
        (
            "tensorflow:gpu:1:graph:mixed_float16",
            "tensorflow",
            "gpu",
            1,
            "graph",
            "mixed_float16",
        ),
        ("torch:mps:eager:float32", "torch", "mps", None, "eager", "float32"),
    ],
)
def test_parse_full_strings(text, backend, device, index, mode, precision):
    config = parse_config(text)
    assert config.backend == backend
    assert config.device == device
    assert config.device_index == index
    assert config.mode == mode
    assert config.precision == precision
    assert str(config) == text


def test_parse_fills_defaults():
    assert str(parse_config("jax")) == "jax:cpu:jit:float32"
    assert str(parse_config("tensorflow:cpu")) == "tensorflow:cpu:graph:float32"
    assert str(parse_config("torch:cpu:eager")) == "torch:cpu:eager:float32"


def test_parse_is_case_and_space_tolerant():
    assert parse_config("  TensorFlow:CPU:XLA ") == parse_config("tensorflow:cpu:xla")


def test_flags_parse_and_sort():
    config = parse_config("tensorflow:cpu:graph:float32:threads=1:onednn=off")
    assert config.threads == 1
    assert config.onednn is False
    assert str(config) == "tensorflow:cpu:graph:float32:onednn=off:threads=1"
    assert parse_config(str(config)) == config


def test_with_flag_sets_and_removes():
    config = parse_config("jax:cpu:jit:float32")
    threaded = config.with_flag("threads", "2")
    assert threaded.threads == 2
    assert threaded.with_flag("threads", None) == config


@pytest.mark.parametrize(
    "text, named",
    [
        ("mxnet:cpu", "'mxnet'"),
        ("jax:tpu", "'tpu'"),
        ("tensorflow:cpu:jit", "'jit'"),
        ("torch:cpu:eager:float8", "'float8'"),
        ("torch:cpu:eager:float32:extra", "'extra'"),
        ("jax:cpu:jit:float32:turbo=1", "'turbo'"),
        ("jax:cpu:jit:float32:threads=0", "threads='0'"),
        ("jax:cpu:jit:float32:threads=two", "threads='two'"),
        ("jax:cpu:jit:float32:onednn=on", "tensorflow only"),
        ("tensorflow:cpu:graph:float32:onednn=maybe", "onednn='maybe'"),
        ("torch:cpu:3:eager", "device index"),
        ("", "''"),
        ("threads=1:jax", "after the precision"),
    ],
)
def test_invalid_strings_name_the_part(text, named):
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert named in str(caught.value) or "CPU takes no device index" in str(
        caught.value
    )
    assert isinstance(caught.value, ParityError)
    assert isinstance(caught.value, ValueError)


def test_error_lists_accepted_values():
    with pytest.raises(ConfigError, match="graph, xla, eager"):
        parse_config("tensorflow:cpu:jit")


def test_parse_configs_comma_list():
    configs = parse_configs("tensorflow:cpu:graph, jax:cpu:jit ,")
    assert [str(c) for c in configs] == [
        "tensorflow:cpu:graph:float32",
        "jax:cpu:jit:float32",
    ]


def test_parse_configs_rejects_empty():
    with pytest.raises(ConfigError, match="No configuration"):
        parse_configs(" , ")


def test_configuration_value_semantics():
    first = Configuration("jax")
    assert first == parse_config("jax:cpu:jit:float32")
    assert len({first, parse_config("jax")}) == 1
    assert first.compiled
    assert not parse_config("torch:cpu:eager").compiled


def test_default_referee_prefers_tensorflow():
    assert (
        str(default_referee(["jax", "tensorflow", "torch"]))
        == "tensorflow:cpu:graph:float64"
    )
    assert str(default_referee(["torch"])) == "torch:cpu:eager:float64"
    assert default_referee([]) is None
