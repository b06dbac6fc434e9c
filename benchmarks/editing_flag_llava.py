"""MultEdit (λI and covariance forms) against FT and FT-L on flag-llava (SmolLM2-135M inside a LLaVA), both tracks.

- correction: the flag questions (single_constraint) flag-llava answers wrong, edited to the gold answer;
- insertion: the encyclopedic (long-tail) flag questions it answers wrong.

For each track, every method edits the chosen layer (the answer-aware trace peak
unless --layers; key position by key distinctness unless --key-position) and one
other layer, one edit at a time and all edits as one batch. Each run is scored
on efficacy (also counted only where the answer still names the edited
image's country), generalization, subject kept (the edited image's answers
still name its country), the three specificity measures (specificity, locality,
neighborhood), seconds per edit (with MultEdit's time split into keys /
delta optimisation / solve) and whether FT-L's bound ever bound. Prints one
measured table per track and writes every run folder under --out.

    python benchmarks/editing_flag_llava.py --model DIR [--limit 24] [--layers L] [--other-layer M] [--out DIR]
    python benchmarks/editing_flag_llava.py --quick ...   # the smoke flag-llava recipe (pipeline check only)
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

METHODS = "multedit,multedit-cov,ft,ft-l"


def _cell(stat) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.2f} [{stat['ci_low']:.2f}, {stat['ci_high']:.2f}]"


def rows_for(document: dict, mode: str) -> list[str]:
    rows = []
    for name, r in document["methods"].items():
        means = [r[k]["mean"] for k in ("efficacy", "generalization", "specificity")]
        score = sum(means) / 3 if None not in means else None
        extra = ""
        if "linf_bound" in r:
            bound = r["linf_bound"]
            extra = "bound never bound" if bound["never_bound"] else \
                f"bound active on {bound['edits_where_active']} of {bound['edit_operations']} edit operations"
        if "seconds_breakdown" in r:
            split = r["seconds_breakdown"]
            extra = f"keys/δ/solve s: {split['keys']:.2f}/{split['delta']:.2f}/{split['solve']:.2f}"
        rows.append(f"| {name} | {document['layers'][0]} | {mode} | {r['edits']} | {_cell(r['efficacy'])} | "
                    f"{_cell(r.get('efficacy_subject_kept'))} | {_cell(r['generalization'])} | "
                    f"{_cell(r.get('subject_kept'))} | {_cell(r['specificity'])} | {_cell(r['locality'])} | "
                    f"{_cell(r['neighborhood'])} | {'–' if score is None else f'{score:.3f}'} | "
                    f"{r['seconds_per_edit']:.2f} | {extra} |")
    return rows


HEADER = ["| Method | Layer | Edits at once | n | Efficacy | Efficacy, subject kept | Generalization | Subject kept "
          "| Specificity | Locality | Neighborhood | Mean (E, G, S) | s / edit | Notes |",
          "|---|---:|---|---:|---|---|---|---|---|---|---|---:|---:|---|"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a flag-llava folder (default: the zoo's, built if missing)")
    parser.add_argument("--quick", action="store_true", help="the smoke flag-llava recipe (checks the pipeline only)")
    parser.add_argument("--data", default=None, help="a VQA-Constraints build with the flags source (default: build one)")
    parser.add_argument("--out", type=Path, default=None, help="where the run folders go (default: a temp folder)")
    parser.add_argument("--limit", type=int, default=24, help="edits per track (default 24)")
    parser.add_argument("--layers", type=int, default=None, help="the chosen layer (default: answer-aware trace peak)")
    parser.add_argument("--other-layer", type=int, default=None, help="the second layer (default: chosen + 3)")
    parser.add_argument("--trace-stats", default=None, help="reuse a trace_stats.json of flag-llava")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--tracks", default="correction,insertion")
    parser.add_argument("--modes", default="single,batch", help="single: one edit at a time; batch: all as one")
    parser.add_argument("--which", default="chosen,other", help="chosen: the chosen layer; other: the second layer")
    parser.add_argument("--specificity-size", type=int, default=32)
    parser.add_argument("--key-position", default="auto", choices=["auto", "subject-token", "constraint", "last"])
    parser.add_argument("--max-new-tokens", type=int, default=24, help="flag-llava's sentence answers need 24")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

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
    model = args.model or flag_llava.build(flag_llava.SMOKE_RECIPE if args.quick else flag_llava.DEFAULT_RECIPE)
    adapter = load_model(model, dtype=args.dtype, device=args.device)
    print(f"flag-llava {model} loaded on {adapter.device} ({adapter.dtype}) in {time.perf_counter() - started:.1f}s")
    chosen = [args.layers] if args.layers is not None else None
    summary = {}
    for track in args.tracks.split(","):
        lines = list(HEADER)
        layers_done: list[int] = []
        for which in args.which.split(","):
            if which == "other":
                if args.other_layer is None and not layers_done:
                    raise SystemExit("error: --which other alone needs --other-layer")
                other = args.other_layer if args.other_layer is not None else min(layers_done[0] + 3, adapter.num_layers - 1)
                layer_list = [other]
            else:
                layer_list = chosen
            for mode in args.modes.split(","):
                options = EditOptions(methods=args.methods.split(","), track=track, layers=layer_list, limit=args.limit,
                                      key_position=args.key_position, specificity_size=args.specificity_size,
                                      max_new_tokens=args.max_new_tokens, trace_stats=args.trace_stats,
                                      batch_edits=1 if mode == "single" else args.limit)
                began = time.perf_counter()
                folder = out / track / f"{which}-{mode}"
                document = run_editing(adapter, str(data), folder, options)
                layer_list = document["layers"]  # trace once; later runs reuse the layer it found
                if which == "chosen":
                    chosen = layer_list
                    layers_done = layer_list
                print(f"{track} {which} layer {layer_list} {mode}: {time.perf_counter() - began:.0f}s "
                      f"(layer: {document['layer_source']}; key position {document['key_position']}: "
                      f"{document['key_position_source']})", flush=True)
                lines += rows_for(document, "1" if mode == "single" else f"all {document['requests']}")
                summary[f"{track}/{which}/{mode}"] = {
                    "layers": document["layers"], "key_position": document["key_position"],
                    "key_distinctness": {p: rows.get(str(layer_list[0]))
                                         for p, rows in document["key_distinctness"].items()},
                    "methods": {n: {k: r[k]["mean"] if isinstance(r[k], dict) and "mean" in r[k] else r[k]
                                    for k in ("efficacy", "generalization", "specificity", "locality",
                                              "neighborhood", "subject_kept", "efficacy_subject_kept", "score",
                                              "seconds_per_edit", "edits")}
                                for n, r in document["methods"].items()},
                }
        print(f"\n## {track}\n")
        print("\n".join(lines) + "\n", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"run folders and summary.json under {out}")


if __name__ == "__main__":
    main()
