"""Measure the model access layer on each tiny family: build, load, encode, batch invariance.

    HF_HUB_OFFLINE=1 python benchmarks/models_access.py [--batch 8]

Prints one line per family; numbers depend on the machine (the README quotes a 2-core CPU run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.models.base import batch_offsets
from harness.models.loading import load_model
from harness.models.tiny import FAMILIES, build_tiny

QUESTIONS = [
    "What is the capital of the country whose flag is in this image?",
    "Which language is spoken in the country in this image, in Europe?",
    "Name the city.",
    "What is the colour of the creature in this image?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32 + 8 * (i % 3), 40, 3), dtype=np.uint8)) for i in range(args.batch)]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as root:
        for family in FAMILIES:
            t0 = time.perf_counter()
            folder = build_tiny(family, Path(root) / family)
            t1 = time.perf_counter()
            adapter = load_model(folder, device="cpu")
            t2 = time.perf_counter()
            if adapter.is_multimodal:
                encodeds = [adapter.encode(q, im, answer="Paris") for q, im in zip(questions, images)]
            else:
                encodeds = [adapter.encode(q, answer="Paris") for q in questions]
            t3 = time.perf_counter()
            with torch.no_grad():
                batched = adapter.model(**adapter.collate(encodeds)).logits
                worst = max(
                    (adapter.model(**e.inputs).logits[0] - batched[row, off:]).abs().max().item()
                    for row, (e, off) in enumerate(zip(encodeds, batch_offsets(encodeds)))
                )
            print(
                f"{family:11s} build {t1 - t0:5.2f}s  load {t2 - t1:5.2f}s  "
                f"encode {1000 * (t3 - t2) / len(encodeds):6.1f} ms/prompt  "
                f"tokens {encodeds[0].length:4d} (image {len(encodeds[0].image_positions):3d})  "
                f"batch-vs-single max |dlogit| {worst:.1e}"
            )


if __name__ == "__main__":
    main()
