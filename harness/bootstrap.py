"""Percentile-bootstrap intervals of a mean, shared by evaluation metrics, trace statistics and editing metrics.

The caller passes the generator, so it decides which draws a seed gives; the
resampling is the same everywhere: one row of ``n`` indices per resample, all
drawn in one call.
"""

from __future__ import annotations

import hashlib

import numpy as np

RESAMPLES = 1000
PERCENTILES_95 = (2.5, 97.5)


def keyed_rng(seed: int, *key: str) -> np.random.Generator:
    """A generator that depends only on the seed and the cell's name, not on the order cells are computed."""
    digest = hashlib.sha256("\x1f".join((str(seed),) + key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def bootstrap_interval(
    data: np.ndarray, rng: np.random.Generator, resamples: int = RESAMPLES, percentiles=PERCENTILES_95
) -> np.ndarray:
    """``[low, high]``: percentiles of the mean over ``resamples`` resamples (with replacement) of ``data``'s
    rows; for 2-D data, one low and one high per column."""
    n = len(data)
    means = data[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    return np.percentile(means, percentiles, axis=0)
