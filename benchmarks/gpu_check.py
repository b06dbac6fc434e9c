"""The checks to run when an accelerator is lent: the zoo models in bfloat16 on CUDA.

For each model (default: the planted LLaVA; add flag-llava with ``--models planted,flag-llava`` where its
SmolLM2 weights are installed) on the planted build's single_constraint test questions:

1. batch 1 vs batch 16: identical generated answers (share), max |confidence difference|, max |answer
   log-prob difference|, and throughput (questions per second) at each batch size;
2. bfloat16 vs float32: accuracy of each and the share of identical answers;
3. tracing in bfloat16: the fast engine against the reference engine, max |p_restored difference| over
   every traced cell, and restorations per second of each;
4. an edit in bfloat16 and in float32 (MultEdit, a few requests): the editing CLI's own summary.

Every number printed is measured in this run. Without a CUDA device it says so and exits with status 0.

    python benchmarks/gpu_check.py [--models planted] [--questions 64] [--trace-limit 8] [--edit-limit 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def zoo_path(name: str) -> Path:
    """The cached zoo model (built here on first use)."""
    code = "import sys; from vqa_constraints.cli import run; sys.exit(run(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "zoo", "build", name], capture_output=True, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def check_batching(adapter, records, label: str) -> dict:
    from harness import scoring

    g1, t1 = timed(lambda: scoring.generate(adapter, records, batch_size=1))
    g16, t16 = timed(lambda: scoring.generate(adapter, records, batch_size=16))
    l1 = scoring.answer_logprobs(adapter, records, batch_size=1)
    l16 = scoring.answer_logprobs(adapter, records, batch_size=16)
    same = sum(a.text == b.text for a, b in zip(g1, g16)) / len(records)
    accuracy = sum(scoring.answer_correct(g.text, r.answers) for g, r in zip(g16, records)) / len(records)
    print(f"  [{label}] batch 1 vs 16: identical answers {same:.1%}, max |conf diff| "
          f"{max(abs(a.confidence - b.confidence) for a, b in zip(g1, g16)):.2e}, max |logprob diff| "
          f"{max(abs(a - b) for a, b in zip(l1, l16)):.2e}; generation {len(records) / t1:.1f} q/s at batch 1, "
          f"{len(records) / t16:.1f} q/s at batch 16; accuracy {accuracy:.1%}")
    return {"answers": [g.text for g in g16], "accuracy": accuracy}


def check_trace(model: Path, data: Path, limit: int, root: Path, device: str) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from harness.tracing.causal_trace import TraceOptions, run_trace

    cells, seconds = {}, {}
    for engine in ("fast", "reference"):
        options = TraceOptions(model=str(model), data=str(data), config="single_constraint", out=root / engine,
                               limit=limit, engine=engine, dtype="bfloat16", device=device, progress=False)
        _, seconds[engine] = timed(lambda: run_trace(options))
        table = pq.read_table(root / engine / "traces.parquet").to_pylist()
        cells[engine] = np.array([row["p_restored"] for row in table], dtype=np.float64)
    if cells["fast"].size == 0:
        print("  trace: no question answered correctly in bf16, nothing traced")
        return
    diff = float(np.abs(cells["fast"] - cells["reference"]).max())
    n = cells["fast"].size
    print(f"  trace bf16 ({limit} questions, {n} restorations): fast vs reference max |p diff| {diff:.2e}; "
          f"fast {n / seconds['fast']:.1f}/s, reference {n / seconds['reference']:.1f}/s (whole command)")


def check_edit(model: Path, data: Path, limit: int, root: Path, device: str) -> None:
    from vqa_constraints.cli import run

    for dtype in ("bfloat16", "float32"):
        out = root / f"edit-{dtype}"
        code = run(["edit", "--model", str(model), "--data", str(data), "--out", str(out), "--method", "multedit",
                    "--limit", str(limit), "--specificity-size", "8", "--dtype", dtype, "--device", device])
        if code != 0 or not (out / "editing_results.json").exists():
            print(f"  edit {dtype}: the edit command failed (exit {code})")
            continue
        document = json.loads((out / "editing_results.json").read_text())
        for name, method in document["methods"].items():
            cells = {key: method[key]["value"] if isinstance(method[key], dict) else method[key]
                     for key in ("efficacy", "generalization", "specificity", "logprob_gain", "seconds_per_edit",
                                 "peak_memory_mb") if key in method}
            print(f"  edit {dtype} {name}: {method['edits']} edits, " +
                  ", ".join(f"{k} {v:.3g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in cells.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="planted", help="comma list of zoo models (planted, flag-llava)")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--trace-limit", type=int, default=8)
    parser.add_argument("--edit-limit", type=int, default=4)
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu only to smoke-test this script")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (run it where a GPU is lent)")
        return 0
    import transformers

    from harness.models.loading import load_model
    from vqa_constraints.builder import build
    from vqa_constraints.loading import load_split

    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(f"device {where}, torch {torch.__version__}, transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        build(data, sources=["planted"], seed=0)
        records = list(load_split(str(data), "single_constraint", "test").records(args.questions))
        for name in args.models.split(","):
            model = zoo_path(name)
            print(f"{name} ({model}), {len(records)} questions")
            cuda = args.device.startswith("cuda")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            bf16 = check_batching(load_model(model, dtype="bfloat16", device=args.device), records, "bf16")
            if cuda:
                print(f"  peak GPU memory (bf16 scoring): {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
            fp32 = check_batching(load_model(model, dtype="float32", device=args.device), records, "fp32")
            same = sum(a == b for a, b in zip(bf16["answers"], fp32["answers"])) / len(records)
            print(f"  bf16 vs fp32: identical answers {same:.1%}, accuracy {bf16['accuracy']:.1%} vs {fp32['accuracy']:.1%}")
            check_trace(model, data, args.trace_limit, root / f"trace-{name}", args.device)
            check_edit(model, data, args.edit_limit, root / name, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
