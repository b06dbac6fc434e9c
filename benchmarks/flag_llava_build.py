"""Build flag-llava with a named recipe and print its timings and accuracies.

    HF_HUB_OFFLINE=1 python benchmarks/flag_llava_build.py [--recipe flag-llava|flag-llava-stage1|flag-llava-direct]
        [--quick] [--force]

The build is cached by recipe hash; pass --force to retrain and measure again
(for a stage-2 recipe: stage 2 only, on the cached stage-1 model). Wall and CPU
time are both printed because the machine may be shared. Several stage-2 seeds:
benchmarks/flag_llava_stage2.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from harness.zoo import flag_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=flag_llava.NAME, choices=sorted(flag_llava.RECIPES))
    parser.add_argument("--quick", action="store_true", help="the smoke recipe instead of the full one")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    full, smoke = flag_llava.RECIPES[args.recipe]
    recipe = smoke if args.quick else full

    wall0 = time.perf_counter()
    folder = flag_llava.build(recipe, force=args.force)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = json.loads((folder / flag_llava.ACCURACY_FILE).read_text())

    print(f"model folder: {folder}")
    print(f"this run: {time.perf_counter() - wall0:.1f} s wall, {usage.ru_utime + usage.ru_stime:.1f} s CPU")
    print("build timings (from the build itself):")
    for key, value in sorted(report["timings"].items()):
        print(f"  {key}: {value}")
    print(f"countries: {report['num_countries']}")
    if "heldout" in report:  # a stage-2 recipe
        print(f"training / held-out countries: {report['num_training_countries']} / {report['num_heldout_countries']}")
        print("held-out countries (accuracy; transfer = image after / named before, kept = named after / before):")
        for relation, row in report["heldout"].items():
            cells = ", ".join(f"{k} {row[k]}" for k in ("image_before", "named_before", "image_after", "named_after",
                                                         "views_after", "transfer_ratio", "knowledge_retained")
                              if k in row)
            print(f"  {relation} (n={row['n']}): {cells}")
        return
    print(f"held-out feature-match accuracy: {report['training']['heldout_feature_match_accuracy']:.3f}")
    print("accuracy (greedy generation):")
    for key, value in report["accuracy"].items():
        print(f"  {key}: {value['accuracy']:.3f} ({value['correct']}/{value['n']})")


if __name__ == "__main__":
    main()
