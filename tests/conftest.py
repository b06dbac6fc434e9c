"""Session-wide fixtures: the built planted dataset, the planted zoo model, tiny family checkpoints.

Zoo models are built through the normal cache (harness/zoo/cache.py), so a
developer builds them once; CI on a fresh machine builds them once per run.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def planted_data_dir(tmp_path_factory):
    """A real build of the bundled `planted` source (all three configs)."""
    from vqa_constraints.builder import build

    out = tmp_path_factory.mktemp("planted-build") / "vqa-constraints"
    build(out, sources=["planted"], seed=0)
    return out


@pytest.fixture(scope="session")
def planted_model_dir():
    """The planted-knowledge LLaVA (test recipe), built once and cached."""
    from harness.zoo.planted import TEST_RECIPE, build

    return build(TEST_RECIPE)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """family -> folder of a tiny randomly initialised checkpoint (built lazily, once)."""
    from harness.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny(family, root / family)
        return built[family]

    return get
