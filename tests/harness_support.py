"""Session fixtures shared by the tests/test_harness_*.py modules (import them with ``from harness_support import *``).

Every evaluation here runs the real planted zoo model on the real planted build.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.evaluate import EvalOptions, evaluate

LIMIT = 6  # questions per config in the small runs


@pytest.fixture(scope="session")
def planted_adapter(planted_model_dir):
    from harness.models.loading import load_model

    return load_model(planted_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def planted_records(planted_data_dir):
    from vqa_constraints.loading import load_split

    return list(load_split(str(planted_data_dir), "single_constraint", "test").records(limit=16))


def run_options(model_dir, data_dir, out, **overrides) -> EvalOptions:
    options = dict(
        model=str(model_dir),
        data=str(data_dir),
        out=Path(out),
        limit=LIMIT,
        batch_size=8,
        scoring="both",
        progress=False,
        show_table=False,
    )
    options.update(overrides)
    return EvalOptions(**options)


@pytest.fixture(scope="session")
def small_run(planted_model_dir, planted_data_dir, planted_adapter, tmp_path_factory):
    """An uninterrupted run: LIMIT questions of each config, scoring both ways, batch size 8."""
    out = tmp_path_factory.mktemp("runs") / "small"
    return evaluate(run_options(planted_model_dir, planted_data_dir, out), adapter=planted_adapter)


@pytest.fixture(scope="session")
def validation_run(planted_model_dir, planted_data_dir, planted_adapter, tmp_path_factory):
    """A full run (no limit) of the small validation split: what a leaderboard submission is made from."""
    out = tmp_path_factory.mktemp("runs") / "validation"
    options = run_options(planted_model_dir, planted_data_dir, out, limit=None, split="validation", batch_size=8)
    return evaluate(options, adapter=planted_adapter)


@pytest.fixture(scope="session")
def flags_data_dir(tmp_path_factory):
    """A real build of the real-world `flags` source: what a leaderboard release is made from."""
    from vqa_constraints.builder import build

    out = tmp_path_factory.mktemp("flags-build") / "vqa-constraints"
    build(out, sources=["flags"], seed=0)
    return out


@pytest.fixture(scope="session")
def flags_validation_run(planted_model_dir, flags_data_dir, planted_adapter, tmp_path_factory):
    """A full run (no limit) of the flags validation split (159 questions): a leaderboard-shaped submission."""
    out = tmp_path_factory.mktemp("runs") / "flags-validation"
    options = run_options(planted_model_dir, flags_data_dir, out, limit=None, split="validation", batch_size=8)
    return evaluate(options, adapter=planted_adapter)
