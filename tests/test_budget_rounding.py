"""Budgets from ratios are exact for exact products (``keep_ratio=0.07`` of 100 tokens keeps 7, not 8)."""

from __future__ import annotations

import pytest

from vtprune.methods import FastV
from vtprune.methods.base import ceil_fraction, resolve_budget
from vtprune.methods.pdrop import stages
from vtprune.methods.st3 import annealed, schedule


@pytest.mark.parametrize(("ratio", "n", "kept"), [
    (0.07, 100, 7),     # the float product is 7.000000000000001
    (0.14, 100, 14),    # 14.000000000000002
    (0.29, 100, 29),    # 28.999999999999996 (already right with ceil; stays right)
    (0.125, 196, 25),   # 24.5 rounds up
    (0.125, 576, 72),
    (0.07, 101, 8),     # 7.07 rounds up
    (1.0, 196, 196),
])
def test_keep_ratio_keeps_the_exact_ceiling(ratio, n, kept):
    assert resolve_budget("m", None, ratio, n) == kept
    assert FastV(keep_ratio=ratio).plan(6, n).keep == kept


def test_a_tiny_ratio_keeps_at_least_one_token():
    assert resolve_budget("m", None, 0.001, 100) == 1


def test_schedules_round_exact_products_exactly():
    assert ceil_fraction(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001 in floats
    assert schedule(10, 4, 0.3, 1, 1) == [10, 7, 5, 4]  # ST3: ceil(0.7 * n) at every layer from 1
    assert annealed(30, 10, 10, 0.1) == 3  # G_min = ceil(0.1 * 30) = 3 (0.1 * 30 = 3.0000000000000004)
    assert stages(100, 4, [1, 2], 0.07) == [100, 7, 1, 1]  # PDrop: ceil(0.07 * 100) = 7
