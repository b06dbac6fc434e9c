"""Measure evaluation throughput (questions per second) of `harness.evaluate` for a model and a build.

    python benchmarks/harness_throughput.py --model DIR --data DIR [--limit 20] [--batch-sizes 1,8] [--scoring generate,logprob]

Prints one line per (scoring, batch size): questions, seconds, questions/second. Runs go to a
temporary folder and are deleted; the model is loaded once.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness.evaluate import EvalOptions, evaluate, load_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="single_constraint")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--scoring", default="generate,logprob")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    base = dict(model=args.model, data=args.data, configs=[args.config], limit=args.limit, device=args.device,
                progress=False, show_table=False)
    adapter = load_adapter(EvalOptions(out=Path("unused"), **base))
    print(f"model {args.model} on {adapter.device} ({adapter.dtype}), {args.limit} questions of {args.config}")
    with tempfile.TemporaryDirectory() as tmp:
        for scoring in args.scoring.split(","):
            for batch_size in map(int, args.batch_sizes.split(",")):
                out = Path(tmp) / f"{scoring}-{batch_size}"
                started = time.perf_counter()
                evaluate(EvalOptions(out=out, scoring=scoring, batch_size=batch_size, **base), adapter=adapter)
                seconds = time.perf_counter() - started
                print(f"scoring={scoring:8s} batch={batch_size:3d}  {args.limit} q in {seconds:6.2f} s  = {args.limit / seconds:6.1f} q/s")


if __name__ == "__main__":
    main()
