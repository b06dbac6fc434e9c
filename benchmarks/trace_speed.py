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
restorations per second, measured in this one process, ``--repeats`` times each
(median and min/max printed), with the thread count and load average beside them.

The FLOP limit: the multiply-adds a restoration must do at the least (the tokens
from the restored position on, through the layers from the restored layer up,
attending to the whole prompt, plus the LM head at the scored position) against
the reference engine's full forward (vision tower, projector, every token through
every layer). Their ratio is the most any engine could gain by skipping work.

    python benchmarks/trace_speed.py [--sizes planted,flag] [--corruption replace] [--repeats 5]
        [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
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
    from harness.models.tiny import build_llava15_shaped

    shape = SIZES[size]
    return build_llava15_shaped(out, shape["vision"], shape["text"], image_size=IMAGE_SIZE, patch=PATCH)


def decoder_flops(text: dict, vocab: int, tokens: int, context: int, layers: int, scored: int) -> float:
    """FLOPs (2 per multiply-add) of ``tokens`` query tokens through ``layers`` decoder layers attending to
    ``context`` keys each, plus the LM head at ``scored`` positions."""
    h, i = text["hidden_size"], text["intermediate_size"]
    d = h // text["num_attention_heads"]
    q_o = 2 * h * text["num_attention_heads"] * d
    k_v = 2 * h * text["num_key_value_heads"] * d
    per_token = 2 * (q_o + k_v + 3 * h * i) + 4 * text["num_attention_heads"] * d * context
    return layers * tokens * per_token + 2 * h * vocab * scored


def vision_flops(vision: dict, text_hidden: int, image_tokens: int) -> float:
    """CLIP tower (patch embedding, every layer over patches + CLS) and the two-layer projector."""
    h, i, n = vision["hidden_size"], vision["intermediate_size"], image_tokens + 1
    per_layer = n * 2 * (4 * h * h + 2 * h * i) + 4 * h * n * n
    return (2 * 3 * PATCH * PATCH * h * image_tokens + vision["num_hidden_layers"] * per_layer
            + 2 * image_tokens * (h * text_hidden + text_hidden * text_hidden))


def flop_limit(size: str, vocab: int, sequence: int, image_tokens: int, sets: list) -> tuple[float, float]:
    """(least FLOPs per restoration, averaged over ``sets``; the reference engine's FLOPs per restoration)."""
    text, vision = SIZES[size]["text"], SIZES[size]["vision"]
    layers = text["num_hidden_layers"]
    least = []
    for cells in sets:
        first = min(q for _, _, q in cells)
        lowest = min(layer for _, layer, _ in cells)
        least.append(decoder_flops(text, vocab, sequence - first, sequence, layers - lowest, 1))
    full = vision_flops(vision, text["hidden_size"], image_tokens) + decoder_flops(text, vocab, sequence, sequence, layers, 1)
    return statistics.fmean(least), full


def timed(engine, prepared, cells, repeats: int) -> tuple[list[float], np.ndarray]:
    """Restorations per second of ``repeats`` runs (after one untimed warm-up run), and the last run's p."""
    engine.score(prepared, cells[:2])
    rates = []
    for _ in range(repeats):
        start_time = time.perf_counter()
        probs = engine.score(prepared, cells)
        rates.append(len(cells) / (time.perf_counter() - start_time))
    return rates, probs


def profile(engine, prepared, cells, top: int) -> str:
    """Where one fast-engine pass over ``cells`` spends its time: the top aten ops by self CPU time, and the
    wall time spent outside any op (Python: hooks, cell bookkeeping, cache objects)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start_time = time.perf_counter()
        engine.score(prepared, cells)
        wall = time.perf_counter() - start_time
    events = prof.key_averages()
    in_ops = sum(e.self_cpu_time_total for e in events) / 1e6
    lines = [f"  wall {wall:.3f} s for {len(cells)} restorations ({wall / len(cells) * 1e3:.2f} ms each); "
             f"self time in aten ops {in_ops:.3f} s, outside ops (Python) {max(wall - in_ops, 0):.3f} s"]
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    for e in ranked:
        lines.append(f"  {e.key:40s} self {e.self_cpu_time_total / 1e6:7.3f} s ({e.self_cpu_time_total / 1e6 / wall:5.1%})"
                     f"  calls {e.count:6d}")
    # The same pass by Python function (hooks, cache update, per-cell bookkeeping), and the LM head's share.
    head = prepared.adapter.model.get_output_embeddings()
    spent = [0.0]
    handles = [head.register_forward_pre_hook(lambda *_: spent.append(-time.perf_counter())),
               head.register_forward_hook(lambda *_: spent.append(time.perf_counter()))]
    profiler = cProfile.Profile()
    profiler.enable()
    engine.score(prepared, cells)
    profiler.disable()
    for handle in handles:
        handle.remove()
    lines.append(f"  LM head: {sum(spent) * 1e3:.2f} ms; top Python functions by own time (cProfile, same pass):")
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (filename, line, function), (_, calls, own, cumulative, _) in rows:
        where = f"{Path(filename).name}:{line}({function})" if line else function
        lines.append(f"  {where[:60]:60s} own {own:7.3f} s  cumulative {cumulative:7.3f} s  calls {calls:6d}")
    return "\n".join(lines)


def bench(size: str, corruption: str, reference_cells: int, repeats: int, profile_top: int, root: Path) -> dict:
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
    # The reference subset spreads over kinds, layers and both positions, like the whole trace.
    ref_sets = sets[:: max(1, len(sets) // reference_cells)][:reference_cells]

    rates, probs, reports = {}, {}, {}
    # "fast" attends to the shared prefix once per batch; "fast-tiled" repeats it per row (the engine before that).
    engines = (("fast", "fast", sets, {}), ("fast-tiled", "fast", sets, {"shared_prefix": False}),
               ("reference", "reference", ref_sets, {}))
    for label, name, cells, options in engines:
        engine = ct.make_engine(name, **options)
        prepared = ct.prepare(adapter, encoded, engine, corruption, positions, seed=0, samples=1)
        if name == "fast":
            assert prepared.extra["prefix_mode"] == ("tiled" if options else "shared"), prepared.extra
        rates[label], probs[label] = timed(engine, prepared, cells, repeats)
        if name == "fast" and profile_top:
            reports[label] = profile(engine, prepared, cells, profile_top)
    picked = [sets.index(c) for c in ref_sets]
    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    least, full = flop_limit(size, vocab, encoded.length, len(encoded.image_positions), sets)
    fast_flops = statistics.fmean(
        decoder_flops(SIZES[size]["text"], vocab, encoded.length - min(q for _, _, q in c), encoded.length,
                      layers - min(l for _, l, _ in c), 1) for c in sets)
    fast, ref = statistics.median(rates["fast"]), statistics.median(rates["reference"])
    return {
        "size": size, "layers": layers, "sequence": encoded.length, "image_tokens": len(encoded.image_positions),
        "question_tokens": question_tokens, "restorations": len(sets), "reference_restorations": len(ref_sets),
        "repeats": repeats, "fast_per_s": rates["fast"], "reference_per_s": rates["reference"],
        "fast_median": fast, "reference_median": ref, "ratio_median": fast / ref,
        "fast_tiled_per_s": rates["fast-tiled"], "fast_tiled_median": statistics.median(rates["fast-tiled"]),
        "tiled_ratio_median": statistics.median(rates["fast-tiled"]) / ref,
        "max_abs_diff_shared_vs_tiled": float(np.abs(probs["fast"] - probs["fast-tiled"]).max()),
        "ratio_range": [min(rates["fast"]) / max(rates["reference"]), max(rates["fast"]) / min(rates["reference"])],
        "least_flops_per_restoration": least, "reference_flops_per_restoration": full, "flop_limit": full / least,
        "reference_gflop_per_s": full * ref / 1e9, "fast_useful_gflop_per_s": fast_flops * fast / 1e9,
        "max_abs_diff": float(np.abs(probs["fast"][picked] - probs["reference"]).max()),
        "profile": reports.get("fast"), "profile_tiled": reports.get("fast-tiled"),
    }


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="planted,flag")
    parser.add_argument("--corruption", default="replace", choices=("replace", "noise", "image-noise"))
    parser.add_argument("--reference-cells", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each engine (median and spread)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", type=int, nargs="?", const=15, default=0, metavar="TOP",
                        help="also profile one fast-engine pass and print its TOP ops (default 15)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (read by trace_cost_7b.py)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = machine()
    print(f"torch {m['torch']}, {m['threads']} threads of {m['cpus']} CPUs, corruption={args.corruption}, "
          f"load average before {m['load_average'][0]:.2f} {m['load_average'][1]:.2f} {m['load_average'][2]:.2f}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            r = bench(size, args.corruption, args.reference_cells, args.repeats, args.profile, Path(tmp))
            r["load_average_after"] = list(os.getloadavg())
            results.append(r)
            print(f"{r['size']:8s} layers={r['layers']:2d} seq={r['sequence']} (image {r['image_tokens']}, "
                  f"question {r['question_tokens']}) restorations={r['restorations']} "
                  f"(reference {r['reference_restorations']}), {r['repeats']} repeats:")
            print(f"  fast {r['fast_median']:.1f}/s (min {min(r['fast_per_s']):.1f}, max {max(r['fast_per_s']):.1f}), "
                  f"reference {r['reference_median']:.2f}/s (min {min(r['reference_per_s']):.2f}, "
                  f"max {max(r['reference_per_s']):.2f})")
            print(f"  fast with the tiled prefix (before): {r['fast_tiled_median']:.1f}/s, ratio "
                  f"{r['tiled_ratio_median']:.1f}x; shared vs tiled max |diff| {r['max_abs_diff_shared_vs_tiled']:.2e}")
            print(f"  median ratio {r['ratio_median']:.1f}x (range {r['ratio_range'][0]:.1f}-{r['ratio_range'][1]:.1f}x); "
                  f"FLOP limit of the speed-up {r['flop_limit']:.1f}x "
                  f"({r['least_flops_per_restoration'] / 1e9:.3f} vs {r['reference_flops_per_restoration'] / 1e9:.2f} GFLOP "
                  f"per restoration); max |diff| {r['max_abs_diff']:.2e}")
            print(f"  achieved: reference {r['reference_gflop_per_s']:.1f} GFLOP/s, fast {r['fast_useful_gflop_per_s']:.1f} "
                  f"useful GFLOP/s; load average after {r['load_average_after'][0]:.2f}")
            for key, title in (("profile", "shared prefix"), ("profile_tiled", "tiled prefix")):
                if r[key]:
                    print(f"  profile of one fast-engine pass, {title} (top ops by self CPU time):")
                    print(r[key])
    if args.json:
        tmp_path = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_path.write_text(json.dumps({"machine": m, "corruption": args.corruption, "results": results}, indent=1))
        tmp_path.replace(args.json)


if __name__ == "__main__":
    main()
