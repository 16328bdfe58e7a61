"""Small contracts that mutation testing found unguarded (benchmarks/RESULTS.md, mutation section)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from actwh.compute.keep import KeepRule
from actwh.errors import ActwhError


def test_keep_rules_are_immutable_values():
    rule = KeepRule.parse("top-k:3")
    assert {rule: 1}[KeepRule("top-k", 3)] == 1  # hashable, equal by value
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.amount = 4


def test_keep_rule_errors_name_the_selection_by_default():
    with pytest.raises(ActwhError, match="^bad selection 'most:3'; use top-k:N, threshold:X or dense$"):
        KeepRule.parse("most:3")


@pytest.mark.parametrize("bad, says", [
    ("most:3", "bad selection 'most:3'; use top-k:N:SCALAR, threshold:X:SCALAR or dense"),
    ("top-k:3", "bad selection 'top-k:3'; use top-k:N:SCALAR, threshold:X:SCALAR or dense"),
    ("dense:mlp_post_act", "bad selection 'dense:mlp_post_act'; use top-k:N:SCALAR, "
                           "threshold:X:SCALAR or dense"),
])
def test_selection_errors_give_the_selection_syntax(bad, says):
    from actwh.compute.selection import Selection

    with pytest.raises(ActwhError, match="^" + re.escape(says) + "$"):
        Selection.parse(bad)
