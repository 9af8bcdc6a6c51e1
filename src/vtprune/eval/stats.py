"""Intervals and paired tests for accuracy figures: every accuracy carries its sample size and a 95 %
interval, and two methods answered on the same questions are compared pairwise.

* :func:`wilson`: the Wilson score interval of a proportion (Wilson, JASA 1927), better than the normal
  (Wald) interval at small n and near 0 or 1.
* :func:`mcnemar`: McNemar's exact test of two paired classifiers: of the questions where exactly one of
  the two is right (b: only A, c: only B), is b / (b + c) far from 1/2? Two-sided binomial p-value.
* :func:`paired_difference`: accuracy of A minus B on the same questions, with a 95 % percentile bootstrap
  interval over questions (seeded).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``correct`` successes in ``n`` trials, as fractions in [0, 1]
    ((0.0, 1.0) for n = 0). Raises ValueError unless 0 <= correct <= n."""
    if not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value for ``only_a`` questions right only under A and ``only_b`` right
    only under B: ``min(1, 2 * P(X <= min(b, c)))`` for X ~ Binomial(b + c, 1/2); 1.0 when b + c = 0."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_difference(a: Sequence[bool], b: Sequence[bool], resamples: int = 10000,
                      seed: int = 0) -> dict:
    """Accuracy of A minus accuracy of B on the same questions (``a[i]``, ``b[i]``: question i right under
    each), with a 95 % percentile bootstrap interval over questions and McNemar's exact p-value.

    Returns:
        ``{"n", "accuracy_a", "accuracy_b", "difference", "low", "high", "only_a", "only_b", "p_mcnemar"}``
        (accuracies and the difference as fractions).

    Raises:
        ValueError: ``a`` and ``b`` of different lengths, or empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need two non-empty answer lists of one length, got {len(a)} and {len(b)}")
    n = len(a)
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    boot = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return {"n": n, "accuracy_a": sum(map(bool, a)) / n, "accuracy_b": sum(map(bool, b)) / n,
            "difference": sum(diffs) / n, "low": boot[int(0.025 * resamples)],
            "high": boot[min(resamples - 1, int(0.975 * resamples))],
            "only_a": only_a, "only_b": only_b, "p_mcnemar": mcnemar(only_a, only_b)}
