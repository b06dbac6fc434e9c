"""Build flag-llava with the full recipe and print its timings and accuracies.

    HF_HUB_OFFLINE=1 python benchmarks/flag_llava_build.py [--quick] [--force]

The build is cached by recipe hash; pass --force to retrain and measure again.
Wall and CPU time are both printed because the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from harness.zoo import flag_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke recipe instead of the full one")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    recipe = flag_llava.SMOKE_RECIPE if args.quick else flag_llava.DEFAULT_RECIPE

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
    print(f"held-out feature-match accuracy: {report['training']['heldout_feature_match_accuracy']:.3f}")
    print("accuracy (greedy generation):")
    for key, value in report["accuracy"].items():
        print(f"  {key}: {value['accuracy']:.3f} ({value['correct']}/{value['n']})")


if __name__ == "__main__":
    main()
