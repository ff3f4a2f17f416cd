"""The benchmarks' shared flags (`bench/harness.py`): config overrides and antidiagonal rows."""

import argparse

import pytest

from bench.harness import add_antidiagonal_arguments, antidiagonal_configs, config_override
from flexsample import SampleConfig


def test_config_override_parses_bools_none_numbers_and_strings():
    assert config_override("estimate_fp8=True") == ("estimate_fp8", True)
    assert config_override("split_tail=False") == ("split_tail", False)
    assert config_override("row_threshold=None") == ("row_threshold", None)
    assert config_override("stride=8") == ("stride", 8)
    assert config_override("alpha=0.95") == ("alpha", 0.95)
    assert config_override("estimator=stripes") == ("estimator", "stripes")
    with pytest.raises(argparse.ArgumentTypeError, match="FIELD one of"):
        config_override("nonsense=1")


def test_antidiagonal_rows_cover_the_fp8_flag():
    parser = argparse.ArgumentParser()
    add_antidiagonal_arguments(parser, strides=[16], alphas=[0.9])
    args = parser.parse_args(["--estimate-fp8", "off", "on"])
    rows = antidiagonal_configs(SampleConfig(), args)
    assert sorted(rows) == ["antidiag max a=0.9 s=16 r=7.5", "antidiag max a=0.9 s=16 r=7.5 fp8"]
    assert rows["antidiag max a=0.9 s=16 r=7.5 fp8"].estimate_fp8
    assert not rows["antidiag max a=0.9 s=16 r=7.5"].estimate_fp8


def test_antidiagonal_rows_cover_the_group_flag():
    parser = argparse.ArgumentParser()
    add_antidiagonal_arguments(parser, strides=[16], alphas=[0.9])
    args = parser.parse_args(["--group-estimate", "off", "on", "--estimate-fp8", "on"])
    rows = antidiagonal_configs(SampleConfig(), args)
    assert sorted(rows) == [
        "antidiag max a=0.9 s=16 r=7.5 fp8",
        "antidiag max a=0.9 s=16 r=7.5 fp8 grp",
    ]
    assert rows["antidiag max a=0.9 s=16 r=7.5 fp8 grp"].group_estimate
    assert not rows["antidiag max a=0.9 s=16 r=7.5 fp8"].group_estimate
