"""Peak memory of the scoring, generation and tracing forwards, before and after logits-only scoring, and
the same formula's prediction for llava-1.5-7b (and Qwen2-VL-7B) on a GPU.

The model is llava-1.5 in sequence and vocabulary (336x336 images in 14-px patches: 576 image tokens; a
32064-token vocabulary) but tiny in width, with random weights (memory does not depend on them), saved and
reloaded through ``load_model``. Each measurement runs in a fresh subprocess: peak resident memory
(``ru_maxrss``) after the operation minus the peak before it (model loaded, inputs encoded), so it is the
operation's own transient peak. "before" is ``model(**batch).logits`` (the LM head over every position);
"after" is ``harness.scoring.logits_at`` (the LM head at the positions read, ``logits_to_keep``).

The formula (bytes; B batch, S sequence, H hidden, I MLP width, V vocabulary, b bytes per element of the
model dtype, K positions whose logits are read, summed over the batch):

    peak ~ weights + B*S*(4*H + 3*I)*b + logits
    logits = B*S*V*b (before)  |  B*K*V*b + K*V*4 (after: kept logits + their float copy)

``B*S*(4*H + 3*I)*b`` is one decoder layer's live activations (residual, normed input, attention output and
q/k/v, gate, up and the activated product; no KV cache in a scoring forward, and SDPA/flash attention keeps
no S x S matrix on a GPU). The CPU measurement is compared with the formula's activation + logits terms.

    python benchmarks/memory.py [--batch 8] [--skip-trace]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

QUESTION = "What is the capital of the country whose flag is in this image?"
CONSTRAINT = "the country whose flag is in this image"
IMAGE_SIZE, PATCH, VOCAB = 336, 14, 32064
TEXT = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
# Real shapes (config.json of each checkpoint) for the prediction; parameters in billions.
REAL = {
    "llava-1.5-7b": dict(params=7.06e9, H=4096, I=11008, V=32064, image_tokens=576),
    "Qwen2-VL-7B (max_pixels 1280*28*28)": dict(params=8.29e9, H=3584, I=18944, V=152064, image_tokens=1280),
}


def build(out: Path) -> Path:
    from harness.models.tiny import build_llava15_shaped

    return build_llava15_shaped(out, VISION, TEXT, vocab_size=VOCAB, image_size=IMAGE_SIZE, patch=PATCH)


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(model_dir: str, what: str, batch: int) -> dict:
    """Run one operation in this (fresh) process; its transient peak in bytes."""
    import numpy as np
    import torch
    from PIL import Image

    from harness import scoring
    from harness.models.loading import load_model

    torch.set_num_threads(1)
    adapter = load_model(model_dir, dtype="float32", device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(batch)]
    answers = ["Paris", "Tokyo", "the capital city", "Berlin"]
    encodeds = [adapter.encode(QUESTION, image, answer=answers[i % 4]) for i, image in enumerate(images)]
    batch_inputs = scoring._collate(adapter, encodeds, "right")
    positions = [list(range(e.answer_positions[0] - 1, e.answer_positions[-1])) for e in encodeds]
    kept = sum(len(p) for p in positions)
    with torch.no_grad():
        adapter.model(**{k: v[:1] for k, v in batch_inputs.items()}, logits_to_keep=1)  # warm-up allocations
        base = _peak_bytes()
        if what == "score-before":
            logits = adapter.model(**batch_inputs).logits
            rows = [logits[r, p].float() for r, p in enumerate(positions)]
        elif what == "score-after":
            rows = scoring.logits_at(adapter.model, batch_inputs, positions)
        elif what == "generate":
            scoring.generate(adapter, [scoring.Prompt(QUESTION, image) for image in images], batch_size=batch)
        elif what.startswith("trace-"):
            from harness.tracing import causal_trace as ct

            encoded = adapter.encode(QUESTION, images[0])
            start = QUESTION.index(CONSTRAINT)
            corrupt = encoded.positions_for_question_span(start, start + len(CONSTRAINT))
            engine = ct.make_engine(what.split("-", 1)[1])
            prepared = ct.prepare(adapter, encoded, engine, "replace", corrupt, seed=0, samples=1)
            cells = [ct.restore_set(kind, layer, corrupt, 1, adapter.num_layers)
                     for kind in ("mlp", "attn") for layer in range(adapter.num_layers)]
            engine.score(prepared, cells)
        peak = _peak_bytes() - base
    first = encodeds[0]
    return {"what": what, "peak": peak, "batch": batch, "sequence": max(e.length for e in encodeds),
            "image_tokens": len(first.image_positions), "kept": kept}


def formula(B: int, S: int, H: int, I: int, V: int, b: int, K: int, logits_only: bool) -> dict:
    activations = B * S * (4 * H + 3 * I) * b
    logits = B * K * V * b + K * V * 4 if logits_only else B * S * V * b
    return {"activations": activations, "logits": logits}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip-trace", action="store_true")
    parser.add_argument("--_measure", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure[0], args._measure[1], args.batch)))
        return
    whats = ["score-before", "score-after", "generate"] + ([] if args.skip_trace else ["trace-fast", "trace-reference"])
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build(Path(tmp) / "llava-shaped"))
        results = {}
        for what in whats:
            done = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--_measure", model, what],
                                  capture_output=True, text=True, check=True)
            results[what] = json.loads(done.stdout.strip().splitlines()[-1])
    first = results["score-before"]
    B, S, K = first["batch"], first["sequence"], first["kept"]
    print(f"llava-1.5-shaped tiny model: B={B}, S={S} ({first['image_tokens']} image tokens), V={VOCAB}, "
          f"H={TEXT['hidden_size']}, I={TEXT['intermediate_size']}, float32; K={K} answer positions read")
    for what, r in results.items():
        print(f"  {what:16s} measured transient peak {mib(r['peak'])}")
    for name, only in (("score-before", False), ("score-after", True)):
        f = formula(B, S, TEXT["hidden_size"], TEXT["intermediate_size"], VOCAB, 4, K, only)
        print(f"  {name:16s} formula activations {mib(f['activations'])} + logits {mib(f['logits'])} "
              f"= {mib(f['activations'] + f['logits'])}")
    print(f"prediction on a GPU, bf16, batch {B}, {S - first['image_tokens']} text tokens, "
          f"{K // B} answer tokens per question:")
    for name, shape in REAL.items():
        seq = shape["image_tokens"] + S - first["image_tokens"]
        weights = shape["params"] * 2
        for label, only in (("before", False), ("after", True)):
            f = formula(B, seq, shape["H"], shape["I"], shape["V"], 2, K, only)
            print(f"  {name:38s} {label:6s} weights {gib(weights)} + activations {gib(f['activations'])} "
                  f"+ logits {gib(f['logits'])} = {gib(weights + f['activations'] + f['logits'])}")


if __name__ == "__main__":
    main()
