"""Every benchmark script is valid Python: they run only by hand or on a lent GPU machine, where a
syntax error would cost the whole device session."""

from __future__ import annotations

import py_compile
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_script_compiles(script):
    py_compile.compile(str(script), doraise=True)


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 10
