"""MultEdit against FT and FT-L on flag-llava (SmolLM2-135M inside a LLaVA), both tracks.

- correction: the flag questions (single_constraint) flag-llava answers wrong, edited to the gold answer;
- insertion: the encyclopedic (long-tail) flag questions it answers wrong.

Every method edits the same layer (the peak causal MLP layer of a trace of
flag-llava, unless --layers) one edit at a time, and is scored on efficacy,
generalization (paraphrases), specificity (a fixed sample of other flag
questions), seconds per edit and peak memory. Prints the measured tables and
writes each run folder under --out.

    python benchmarks/editing_flag_llava.py [--limit 40] [--layers L] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a flag-llava folder (default: build or reuse the zoo's)")
    parser.add_argument("--data", default=None, help="a VQA-Constraints build with the flags source (default: build one)")
    parser.add_argument("--out", type=Path, default=None, help="where the run folders go (default: a temp folder)")
    parser.add_argument("--limit", type=int, default=None, help="at most N edits per track (default: all wrong answers)")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: traced peak MLP layer)")
    parser.add_argument("--trace-stats", default=None, help="reuse a trace_stats.json of flag-llava")
    parser.add_argument("--methods", default="multedit,ft,ft-l")
    parser.add_argument("--tracks", default="correction,insertion")
    parser.add_argument("--specificity-size", type=int, default=32)
    parser.add_argument("--key-position", default="last", choices=["constraint", "last"])
    parser.add_argument("--preserve", type=int, default=0, help="MultEdit: validation questions whose keys stay mapped")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from editing.report import table
    from editing.runner import EditOptions, run_editing
    from harness.models.loading import load_model
    from harness.zoo import flag_llava

    out = args.out or Path(tempfile.mkdtemp(prefix="editing-flag-llava-"))
    data = args.data
    if data is None:
        from vqa_constraints.builder import build

        data = out / "flags-build"
        if not (data / "README.md").exists():
            build(data, sources=["flags"], seed=0)
    started = time.perf_counter()
    adapter = load_model(args.model or flag_llava.build(), dtype=args.dtype, device=args.device)
    print(f"flag-llava loaded on {adapter.device} ({adapter.dtype}) in {time.perf_counter() - started:.1f}s")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    trace_stats = args.trace_stats
    for track in args.tracks.split(","):
        options = EditOptions(methods=args.methods.split(","), track=track, layers=layers, limit=args.limit,
                              key_position=args.key_position, specificity_size=args.specificity_size,
                              preserve_size=args.preserve,
                              trace_stats=trace_stats)
        began = time.perf_counter()
        document = run_editing(adapter, str(data), out / track, options)
        # Trace once; the second track reuses the layer the first one found.
        layers = document["layers"]
        print(f"\n## {track} ({time.perf_counter() - began:.0f}s)\n")
        print(table(document))
    print(f"run folders under {out}")


if __name__ == "__main__":
    main()
