"""Predict the time and memory of the paper's tracing study and an editing benchmark on llava-1.5-7b.

A prediction, not a measurement: no accelerator was lent when this was written. It combines

- llava-1.5-7b's shape (32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32064, CLIP ViT-L/14-336:
  24 layers, hidden 1024, MLP 4096; 576 image tokens, a ~600-token prompt);
- the FLOP counts of ``trace_speed.py`` (least work per restoration; full forward for the reference);
- the fast engine's measured efficiency *relative to a dense forward* (its useful FLOP/s over the reference
  engine's FLOP/s, from a ``trace_speed.py --json`` output on the SmolLM2 shape), carried over to the GPU;
- an assumed GPU: bf16 dense peak and the fraction of it a dense 7B forward reaches (MFU), and its memory
  bandwidth, since every batch of suffix runs re-reads the weights and the shared prefix cache (once per
  batch: the fast engine attends to one copy, harness/tracing/shared_prefix.py) and writes and reads each
  row's attention scores over the prefix.
- editing: MultEdit's delta steps run only the tokens from the key position on (the image prefix is cached:
  editing/prefix_cache.py); FT's steps train the weights and must run the whole prompt.

    python benchmarks/trace_cost_7b.py [--speed-json trace_speed.json] [--questions 9700] [--gpus 8]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trace_speed import PATCH, decoder_flops  # noqa: E402  (same FLOP model as the measurement)

TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24)
VOCAB, IMAGE_TOKENS, PARAMS = 32064, 576, 7.06e9
GIB = 1 << 30


def vision_flops() -> float:
    h, i, n = VISION["hidden_size"], VISION["intermediate_size"], IMAGE_TOKENS + 1
    per_layer = n * 2 * (4 * h * h + 2 * h * i) + 4 * h * n * n
    d = TEXT["hidden_size"]
    return 2 * 3 * PATCH * PATCH * h * IMAGE_TOKENS + VISION["num_hidden_layers"] * per_layer + 2 * IMAGE_TOKENS * (h * d + d * d)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speed-json", type=Path, default=None, help="trace_speed.py --json output (flag shape is used)")
    p.add_argument("--relative-efficiency", type=float, default=None,
                   help="fast engine useful FLOP/s over a dense forward's (default: from --speed-json, else 0.2)")
    p.add_argument("--questions", type=int, default=9700)
    p.add_argument("--prompt", type=int, default=600, help="tokens per prompt (576 image + system + question)")
    p.add_argument("--constraint-start", type=int, default=590, help="position of the first constraint token")
    p.add_argument("--constraints", type=float, default=1.5, help="mean constraints per question")
    p.add_argument("--kinds", type=int, default=3)
    p.add_argument("--tflops", type=float, default=989.0, help="bf16 dense peak TFLOP/s (H100/H200 SXM)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak a dense 7B forward reaches")
    p.add_argument("--bandwidth", type=float, default=4.8, help="memory bandwidth TB/s (H200; H100 3.35)")
    p.add_argument("--memory", type=float, default=141.0, help="GPU memory GB (H200; H100 80)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--edits", type=int, default=300, help="edit requests in the editing benchmark")
    p.add_argument("--edit-steps", type=int, default=25, help="δ / fine-tuning gradient steps per edit (at most)")
    p.add_argument("--edit-prompts", type=int, default=4, help="prompts per optimisation step (question + paraphrases)")
    p.add_argument("--eval-prompts", type=int, default=14, help="forwards per edit to score it (before and after)")
    p.add_argument("--key-position", type=int, default=585, help="MultEdit's key position (start of its delta steps)")
    a = p.parse_args()

    measured = None
    if a.speed_json is not None:
        doc = json.loads(a.speed_json.read_text())
        measured = next(r for r in doc["results"] if r["size"] == "flag")
        load = doc["machine"]["load_average"][0]
    rel = a.relative_efficiency or (measured["fast_useful_gflop_per_s"] / measured["reference_gflop_per_s"]
                                    if measured else 0.2)
    dense = a.tflops * 1e12 * a.mfu
    layers, hidden, T = TEXT["num_hidden_layers"], TEXT["hidden_size"], a.prompt

    # Restorations per question: kinds x layers x (each constraint's tokens, the last token), window 1.
    per_question = a.kinds * layers * (a.constraints + 1)
    least = []  # least FLOPs of one restoration, averaged over layers, for each position group
    for first in (a.constraint_start, T - 1):
        least.append(sum(decoder_flops(TEXT, VOCAB, T - first, T, layers - l, 1) for l in range(layers)) / layers)
    least_mean = (a.constraints * least[0] + least[1]) / (a.constraints + 1)
    full = vision_flops() + decoder_flops(TEXT, VOCAB, T, T, layers, 1)
    # Per question also: greedy answer (~10 tokens), clean + corrupted runs, the fast engine's exactness checks.
    fixed = 6 * full
    compute_s = a.questions * (per_question * least_mean / (dense * rel) + fixed / dense)
    # Memory traffic: every batch reads the weights and the shared prefix cache once, and writes + reads each
    # row's float32 attention scores and weights over the prefix (one layer at a time; suffix ~ T - first).
    kv_prefix = 2 * layers * T * hidden * 2  # bytes, bf16: one copy per question, not per row
    suffix = (a.constraints * (T - a.constraint_start) + 1) / (a.constraints + 1)
    scores_row = 2 * 2 * 4 * TEXT["num_attention_heads"] * suffix * T * layers  # written and read, fp32
    free = a.memory * 1e9 - PARAMS * 2 - kv_prefix
    rows = max(1, min(a.max_batch, int(free * 0.5 // (scores_row / layers))))
    batches = a.questions * math.ceil(per_question / rows)
    traffic_s = batches * (PARAMS * 2 + kv_prefix + rows * scores_row) / (a.bandwidth * 1e12)
    trace_s = max(compute_s, traffic_s)
    reference_s = a.questions * (per_question * full + fixed) / dense
    peak = PARAMS * 2 + 3 * kv_prefix + rows * scores_row / layers + 2 * layers * T * hidden * 2 + 1 * GIB

    # Editing: each optimisation step is a forward + backward (~3x a forward) over the prompts. MultEdit's delta
    # steps run the tokens from the key position on (a cached prefix); FT's run the whole prompt.
    ft_step = 3 * decoder_flops(TEXT, VOCAB, T, T, layers, 1) * a.edit_prompts
    multedit_step = 3 * decoder_flops(TEXT, VOCAB, T - a.key_position, T, layers, 1) * a.edit_prompts
    prefix_once = decoder_flops(TEXT, VOCAB, T, T, layers, 1) * a.edit_prompts  # the cached prefix, per edit
    scoring = a.eval_prompts * 2 * full
    edit_s = a.edits * (a.edit_steps * ft_step + scoring) / dense
    multedit_s = a.edits * (a.edit_steps * multedit_step + prefix_once + scoring) / dense
    # Rough: weights + one step's saved activations over every layer (no optimizer state: δ is one vector).
    edit_peak = PARAMS * 2 + a.edit_prompts * T * (4 * hidden + 3 * TEXT["intermediate_size"]) * 2 * layers + 2 * GIB

    src = (f"measured relative efficiency {rel:.3f} from {a.speed_json} (flag shape, load average {load:.2f})"
           if measured else f"relative efficiency {rel:.3f} (assumed; pass --speed-json to use a measurement)")
    print("llava-1.5-7b, bf16, one prompt = %d tokens (576 image); PREDICTION, no accelerator measured" % T)
    print(f"GPU assumed: {a.tflops:.0f} TFLOP/s bf16 dense peak, {a.mfu:.0%} MFU for a dense forward, "
          f"{a.bandwidth} TB/s, {a.memory:.0f} GB; {src}")
    print(f"tracing {a.questions} questions (all traced: an upper bound; only correct ones are), {a.kinds} kinds x "
          f"{layers} layers x {a.constraints + 1:g} position groups = {per_question:.0f} restorations/question, window 1")
    print(f"  least work per restoration {least_mean / 1e9:.1f} GFLOP vs reference {full / 1e9:.0f} GFLOP "
          f"(FLOP limit {full / least_mean:.0f}x)")
    print(f"  fast engine, 1 GPU: compute {compute_s / 3600:.2f} h, memory traffic {traffic_s / 3600:.2f} h "
          f"(batch {rows}, shared prefix cache {kv_prefix / GIB:.2f} GiB, {scores_row / GIB:.3f} GiB of attention "
          f"scores per row) -> {trace_s / 3600:.2f} h; "
          f"peak memory ~{peak / GIB:.0f} GiB")
    print(f"  fast engine, {a.gpus} GPUs with --shard I/{a.gpus}: {trace_s / a.gpus / 3600:.2f} h each "
          f"(+ ~1 min model load per shard)")
    print(f"  reference engine, 1 GPU: {reference_s / 3600:.1f} h")
    print(f"editing {a.edits} requests (<= {a.edit_steps} steps x {a.edit_prompts} prompts each, "
          f"{a.eval_prompts} scoring forwards before and after):")
    print(f"  FT, 1 GPU: {edit_s / 3600:.2f} h ({edit_s / a.edits:.1f} s/edit), peak ~{edit_peak / GIB:.0f} GiB; "
          f"{a.gpus} GPUs: {edit_s / a.gpus / 3600:.2f} h (requests split into "
          f"{a.gpus} disjoint runs by hand: `edit` has no --shard yet)")
    print(f"  MultEdit (delta steps from position {a.key_position} on), 1 GPU: {multedit_s / 3600:.2f} h "
          f"({multedit_s / a.edits:.1f} s/edit); {a.gpus} GPUs: {multedit_s / a.gpus / 3600:.2f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
