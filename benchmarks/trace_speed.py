"""Time the fast and reference tracing engines side by side on a LLaVA-shaped prompt.

Two random-weight LLaVA checkpoints of the right shapes (timing does not depend
on the weights), saved and reloaded through ``load_model`` like any model:

- planted size: Llama decoder hidden 128, 6 layers, MLP 512; CLIP tower hidden 64, 2 layers;
- flag-llava size: the SmolLM2-135M decoder (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536);
  CLIP tower hidden 256, 4 layers.

Both see 336x336 images in 14-px patches (576 image tokens, as llava-1.5) and a
question of about 20 tokens. One trace = every (kind, layer) restored at the
constraint tokens and at the last token. The reference engine is timed on the
first ``--reference-cells`` restorations (it is slow); both rates are
restorations per second, measured in this one process.

    python benchmarks/trace_speed.py [--sizes planted,flag] [--corruption replace]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = {
    "planted": dict(text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=4),
                    vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)),
    "flag": dict(text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3),
                 vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)),
}
QUESTION = "What is the capital of the country whose flag is in this image?"
CONSTRAINT = "the country whose flag is in this image"
IMAGE_SIZE, PATCH = 336, 14


def build_checkpoint(size: str, out: Path) -> Path:
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from harness.models.tiny import LLAVA_CHAT_TEMPLATE, bpe_tokenizer

    torch.manual_seed(0)
    tokenizer = bpe_tokenizer(["<image>"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>", chat_template=LLAVA_CHAT_TEMPLATE,
    )
    shape = SIZES[size]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, **shape["vision"]).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=0,
                                eos_token_id=1, pad_token_id=2, **shape["text"]).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def bench(size: str, corruption: str, reference_cells: int, root: Path) -> dict:
    from harness.models.loading import load_model
    from harness.tracing import causal_trace as ct
    from harness.tracing.patching import KINDS

    adapter = load_model(build_checkpoint(size, root / size), dtype="float32", device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    encoded = adapter.encode(QUESTION, image)
    start = QUESTION.index(CONSTRAINT)
    positions = encoded.positions_for_question_span(start, start + len(CONSTRAINT))
    end = encoded.question_start + len(QUESTION)
    question_tokens = sum(1 for a, b in encoded.token_char_spans if a >= encoded.question_start and b <= end)
    layers = adapter.num_layers
    sets = [ct.restore_set(kind, layer, pos, 1, layers)
            for pos in (positions, [encoded.last_position]) for kind in KINDS for layer in range(layers)]

    rates, probs = {}, {}
    for name, cells in (("fast", sets), ("reference", sets[:reference_cells])):
        engine = ct.make_engine(name)
        prepared = ct.prepare(adapter, encoded, engine, corruption, positions, seed=0, samples=1)
        start_time = time.perf_counter()
        probs[name] = engine.score(prepared, cells)
        rates[name] = len(cells) / (time.perf_counter() - start_time)
    common = len(probs["reference"])
    return {
        "size": size, "layers": layers, "sequence": encoded.length, "image_tokens": len(encoded.image_positions),
        "question_tokens": question_tokens, "restorations": len(sets), "fast_per_s": rates["fast"],
        "reference_per_s": rates["reference"], "ratio": rates["fast"] / rates["reference"],
        "max_abs_diff": float(np.abs(probs["fast"][:common] - probs["reference"]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="planted,flag")
    parser.add_argument("--corruption", default="replace", choices=("replace", "noise", "image-noise"))
    parser.add_argument("--reference-cells", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, corruption={args.corruption}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            r = bench(size, args.corruption, args.reference_cells, Path(tmp))
            print(f"{r['size']:8s} layers={r['layers']:2d} seq={r['sequence']} (image {r['image_tokens']}, question {r['question_tokens']}) "
                  f"restorations={r['restorations']}: fast {r['fast_per_s']:.1f}/s, reference {r['reference_per_s']:.2f}/s, "
                  f"ratio {r['ratio']:.1f}x, max |diff| {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
