"""flag-llava stage 2 on several seeds: held-out accuracy, transfer and knowledge kept, mean and spread.

    HF_HUB_OFFLINE=1 python benchmarks/flag_llava_stage2.py [--recipe flag-llava|flag-llava-direct]
        [--seeds 0 1 2] [--quick] [--out summary.json]

All seeds share one stage-1 model (built first if it is not cached); each seed
draws its own training/held-out split of the countries and its own question
order, and its model is cached by recipe like any zoo build (delete the
stage-2 folders to measure the build time again). Numbers are read back from
each model's ``zoo_accuracy.json``; wall and CPU times are printed because the
machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from harness.zoo import flag_llava

COLUMNS = ("image_before", "named_before", "image_after", "named_after", "transfer_ratio", "knowledge_retained",
           "views_after")  # views: recognition of held-out augmented views
GOAL = {"transfer_ratio": 0.8, "knowledge_retained": 0.9}  # issue #13, on capitals


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stage2_names = [n for n, (r, _) in flag_llava.RECIPES.items() if isinstance(r, flag_llava.FlagLlavaStage2Recipe)]
    parser.add_argument("--recipe", default=flag_llava.NAME, choices=stage2_names)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="the smoke recipe (seconds of training, tiny stage 1)")
    parser.add_argument("--out", default=None, help="also write the summary here as JSON")
    args = parser.parse_args()
    full, smoke = flag_llava.RECIPES[args.recipe]
    recipe = smoke if args.quick else full

    started = time.perf_counter()
    stage1 = flag_llava.build(recipe.stage1)
    print(f"stage 1: {stage1} ({time.perf_counter() - started:.1f} s here, 0 when cached)")
    runs = []
    for seed in args.seeds:
        seeded = replace(recipe, seed=seed)
        started = time.perf_counter()
        folder = flag_llava.build(seeded)
        report = json.loads((folder / flag_llava.ACCURACY_FILE).read_text())
        runs.append(report)
        timings = report["timings"]
        print(f"seed {seed}: {folder} ({time.perf_counter() - started:.1f} s here; build: "
              f"{timings['total_wall_seconds']} s wall, {timings['train_wall_seconds']} s training, "
              f"{timings['torch_threads']} threads; {report['num_training_countries']} training / "
              f"{report['num_heldout_countries']} held-out countries)")

    relations = list(runs[0]["heldout"])
    print(f"\nheld-out countries, {args.recipe}{' (quick)' if args.quick else ''}, seeds {args.seeds}: mean ± sd")
    print("| relation | n | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    summary = {"recipe": args.recipe, "quick": args.quick, "seeds": args.seeds, "relations": {}}
    for relation in relations:
        rows = [run["heldout"][relation] for run in runs]
        values = {c: [row.get(c) for row in rows] for c in COLUMNS}
        summary["relations"][relation] = {"n": [row["n"] for row in rows], **values}
        cells = [_cell(values[c]) for c in COLUMNS]
        print(f"| {relation} | {'/'.join(str(row['n']) for row in rows)} | " + " | ".join(cells) + " |")
    capital = summary["relations"].get("capital", {})
    met = [t is not None and k is not None and t >= GOAL["transfer_ratio"] and k >= GOAL["knowledge_retained"]
           for t, k in zip(capital.get("transfer_ratio", []), capital.get("knowledge_retained", []))]
    summary["capital_goal_met"] = met
    print(f"\ncapital goal (transfer_ratio >= {GOAL['transfer_ratio']}, knowledge_retained >= "
          f"{GOAL['knowledge_retained']}): met on {sum(met)} of {len(met)} seeds")
    summary["build_wall_seconds"] = [run["timings"]["total_wall_seconds"] for run in runs]
    summary["stage1_timings"] = runs[0]["stage1_timings"]
    summary["training_capital_from_image"] = [run["training_countries_after"]["capital_from_image"]["accuracy"]
                                              for run in runs]
    print(f"capital from the image on training countries after tuning: {summary['training_capital_from_image']}")
    print(f"stage-2 build wall seconds per seed: {summary['build_wall_seconds']}")
    print(f"stage-1 build: {summary['stage1_timings'].get('total_wall_seconds')} s wall (when it was built)")
    if args.out:
        out = Path(args.out)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(summary, indent=2) + "\n")
        partial.rename(out)


if __name__ == "__main__":
    main()
