"""MultEdit against FT, FT-L (bound tuned on validation) and MEMIT-style least squares on flag-llava and
flag-llava-direct, both tracks, one edit at a time and all edits as one batch.

- correction: flag questions (single_constraint) the model answers wrong, edited to the gold answer;
- insertion: encyclopedic (long-tail) flag questions it answers wrong.

Every run edits at most one request per country (so one batch never holds two edits with the same image), keys
MultEdit at the visual constraint's last token (the paper's key; other --key-positions are reported as separate
rows), makes every automatic choice (FT-L's bound, an ``auto`` key) on the validation split, estimates the
covariance of multedit-cov and memit-ls from the model's own text (N >> d), and renders augmented views of each
flag (crop, rotation, colour jitter) so generalization tests the key, not only the question's wording. Each row
gives the harmonic-mean score (ROME's convention) with the arithmetic mean beside it, every component with a 95%
interval that resamples countries, and seconds per edit; each track ends with the paired comparisons (MultEdit
variant − baseline, same edits, countries resampled) and their verdicts.

    python benchmarks/editing_flag_llava.py --model DIR --data BUILD --layers 9 --out DIR
    python benchmarks/editing_flag_llava.py --models flag-llava,flag-llava-direct --layers 9 ...  # the zoo's builds
    python benchmarks/editing_flag_llava.py --planted --limit 6 --out DIR   # smoke run on the planted model
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

METHODS = "multedit,multedit-cov,memit-ls,ft,ft-l"
HEADER = ["| Model | Track | Method | Key | Layer | Edits at once | n (countries) | Score (harmonic) | Mean (arith.) "
          "| Efficacy score | Efficacy magnitude | Efficacy (generated) | Generalization score "
          "| Generalization (generated) | Neighbourhood | Same subject | Locality | s / edit |",
          "|---|---|---|---|---:|---|---|---|---|---|---|---|---|---|---|---|---|---:|"]


def _cell(stat) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.2f} [{stat['ci_low']:.2f}, {stat['ci_high']:.2f}]"


def rows_for(model: str, document: dict, mode: str) -> list[str]:
    rows = []
    for name, r in document["methods"].items():
        rows.append(f"| {model} | {document['options']['track']} | {name} | {r['key_position']} | "
                    f"{document['layers'][0]} | {mode} | {r['edits']} ({r['subjects']}) | {_cell(r['score_ci'])} | "
                    f"{_cell(r['score_arithmetic_ci'])} | {_cell(r['efficacy_score'])} | "
                    f"{_cell(r['efficacy_magnitude'])} | {_cell(r['efficacy'])} | {_cell(r['generalization_score'])} | "
                    f"{_cell(r['generalization'])} | {_cell(r['neighborhood'])} | {_cell(r['same_subject'])} | "
                    f"{_cell(r['locality'])} | {r['seconds_per_edit']:.2f} |")
    return rows


def comparison_rows(model: str, document: dict, mode: str) -> list[str]:
    return [f"| {model} | {document['options']['track']} | {c['method']} ({document['key_position']}) | {c['baseline']} "
            f"| {mode} | {c['difference']:+.3f} | [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['n_edits']} "
            f"| {c['n_subjects']} | {c['verdict']} |"
            for c in document["comparisons"] if c["difference"] is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="one model folder (default: the zoo builds named by --models)")
    parser.add_argument("--models", default="flag-llava,flag-llava-direct",
                        help="zoo models, built if missing (default: flag-llava,flag-llava-direct)")
    parser.add_argument("--planted", action="store_true",
                        help="stand-in: the planted model and a planted build (checks the pipeline end to end)")
    parser.add_argument("--data", default=None, help="a VQA-Constraints build (default: build the flags source)")
    parser.add_argument("--out", type=Path, default=None, help="where the run folders go (default: a temp folder)")
    parser.add_argument("--limit", type=int, default=50, help="edits per track, one per country (default 50)")
    parser.add_argument("--layers", default=None, help="the edited layer, e.g. 9 (default: the traced peak; "
                        "flag-llava's traces find none, so pass the stated layer)")
    parser.add_argument("--trace-stats", default=None, help="take the layer from this trace_stats.json")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--tracks", default="correction,insertion")
    parser.add_argument("--modes", default="single,batch", help="single: one edit at a time; batch: all as one")
    parser.add_argument("--key-positions", default="constraint",
                        help="MultEdit keys, each its own rows: constraint (the paper's), subject-token, last, auto")
    parser.add_argument("--specificity-size", type=int, default=32)
    parser.add_argument("--neighbours", type=int, default=8)
    parser.add_argument("--validation-size", type=int, default=12)
    parser.add_argument("--augment-views", type=int, default=2)
    parser.add_argument("--corpus-keys", type=int, default=20000)
    parser.add_argument("--method-config", default=None, help="hyper-parameters per method (YAML)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="flag-llava's sentence answers need 24")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from editing.method_config import load_method_config
    from editing.runner import EditOptions, run_editing
    from harness.models.loading import load_model

    out = args.out or Path(tempfile.mkdtemp(prefix="editing-flag-llava-"))
    method_options = load_method_config(args.method_config) if args.method_config else {}
    data = args.data
    if data is None:
        from vqa_constraints.builder import build

        data = out / ("planted-build" if args.planted else "flags-build")
        if not (data / "README.md").exists():
            build(data, sources=["planted" if args.planted else "flags"], seed=0)
    if args.planted:
        from harness.zoo import planted

        models = {"planted": args.model or planted.build()}
    elif args.model:
        models = {Path(args.model).name: args.model}
    else:
        from harness.zoo import flag_llava

        recipes = {"flag-llava": flag_llava.DEFAULT_RECIPE, "flag-llava-direct": flag_llava.DIRECT_RECIPE}
        unknown = [name for name in args.models.split(",") if name not in recipes]
        if unknown:
            raise SystemExit(f"error: --models {unknown[0]}: choose from {', '.join(recipes)}")
        models = {name: flag_llava.build(recipes[name]) for name in args.models.split(",")}
    layers = [int(part) for part in args.layers.split(",")] if args.layers else None
    summary, table, comparisons = {}, list(HEADER), [
        "| Model | Track | MultEdit variant | Baseline | Edits at once | Δ score | 95% interval | Edits | Countries "
        "| Verdict |", "|---|---|---|---|---|---:|---|---:|---:|---|"]
    for model_name, model in models.items():
        started = time.perf_counter()
        adapter = load_model(model, dtype=args.dtype, device=args.device)
        print(f"{model_name}: {model} loaded on {adapter.device} ({adapter.dtype}) in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
        for track in args.tracks.split(","):
            for key in args.key_positions.split(","):
                for mode in args.modes.split(","):
                    options = EditOptions(
                        methods=args.methods.split(","), track=track, layers=layers, limit=args.limit,
                        key_position=key, specificity_size=args.specificity_size, neighbours=args.neighbours,
                        validation_size=args.validation_size, augment_views=args.augment_views,
                        corpus_keys=args.corpus_keys, max_new_tokens=args.max_new_tokens,
                        trace_stats=args.trace_stats, method_options=method_options,
                        method_config=args.method_config, batch_edits=1 if mode == "single" else args.limit)
                    began = time.perf_counter()
                    folder = out / model_name / track / f"{key}-{mode}"
                    document = run_editing(adapter, str(data), folder, options)
                    layers = document["layers"]  # trace once; later runs reuse the layer it found
                    label = "1" if mode == "single" else f"all {document['requests']}"
                    print(f"{model_name} {track} key {document['key_position']} {mode}: "
                          f"{time.perf_counter() - began:.0f}s (layer {layers}: {document['layer_source']})",
                          flush=True)
                    table += rows_for(model_name, document, label)
                    comparisons += comparison_rows(model_name, document, label)
                    summary[f"{model_name}/{track}/{key}/{mode}"] = {
                        "folder": str(folder), "layers": document["layers"], "layer_source": document["layer_source"],
                        "key_position": document["key_position"], "choices": document["choices"],
                        "comparisons": document["comparisons"],
                        "methods": {n: {k: r[k] for k in ("score", "score_arithmetic", "edits", "subjects",
                                                          "seconds_per_edit")}
                                    for n, r in document["methods"].items()},
                    }
    print("\n" + "\n".join(table) + "\n")
    print("\n".join(comparisons) + "\n", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "tables.md").write_text("\n".join(table) + "\n\n" + "\n".join(comparisons) + "\n")
    print(f"run folders, tables.md and summary.json under {out}")


if __name__ == "__main__":
    main()
