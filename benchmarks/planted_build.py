"""Build the planted model from scratch and print build time, accuracies and a trace check.

    python benchmarks/planted_build.py [--quick] [--reuse]

Builds into a temporary folder (never the cache), so the time is a full
build: training + saving + the accuracy evaluation written to zoo_accuracy.json.
With --reuse the cached model is used (built if missing) and no time is printed.
Wall time depends on how busy the machine is, so CPU time is printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from transformers import AutoProcessor, LlavaForConditionalGeneration

from harness.zoo import planted
from harness.zoo.planted.check import mlp_restoration_effects
from vqa_constraints.sources.planted import records


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the --quick recipe instead of the default")
    parser.add_argument("--reuse", action="store_true", help="score the cached model instead of timing a fresh build")
    args = parser.parse_args()
    recipe = planted.QUICK_RECIPE if args.quick else planted.DEFAULT_RECIPE

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "planted"
        wall, cpu = time.perf_counter(), cpu_seconds()
        if args.reuse:
            folder = planted.build(recipe)
        else:
            planted.build_into(folder, recipe)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        accuracy = planted.load_accuracy(folder)
        model = LlavaForConditionalGeneration.from_pretrained(folder, use_safetensors=True).eval()
        processor = AutoProcessor.from_pretrained(folder)

    print(f"recipe: {'quick' if args.quick else 'default'}  planted layer K={recipe.planted_layer} of {recipe.layers}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    if not args.reuse:
        print(f"build wall time: {wall:.1f} s   CPU time: {cpu:.1f} s ({planted.BUILD_THREADS} threads)")
    print(f"questions from: {accuracy['questions_from']}")
    for config in ("single_constraint", "multi_constraint", "encyclopedic"):
        row = accuracy[config]
        parts = [f"{name} {row[name]['accuracy']}" for name in ("paraphrases", "other_views", "text_only") if row[name]["n"]]
        print(f"{config:18s} accuracy {row['accuracy']} (n={row['n']}); " + "; ".join(parts))
    print("naming: " + ", ".join(f"{role} {v['accuracy']}" for role, v in accuracy["naming"].items()))
    print(f"scaffold (phase-1) facts: {accuracy['scaffold_facts']['accuracy']}")
    print(f"chance (one of 20 values): {accuracy['chance_single_answer']}")

    world = planted.world_for(recipe)
    single = [r for r in records(world) if r.split == "test" and r.config == "single_constraint"]
    started = time.perf_counter()
    trace = mlp_restoration_effects(model, processor, [(r.question, r.image, r.answers[0]) for r in single])
    print(f"trace check (image noise, restore one MLP at the last token), {time.perf_counter() - started:.1f} s:")
    print(json.dumps(trace))


if __name__ == "__main__":
    main()
