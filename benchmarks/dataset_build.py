"""Time `build` of the bundled sources (flags + planted) and of validate; prints measured numbers.

    python benchmarks/dataset_build.py [--repeats 3]

Target from the issue: building all bundled sources under a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vqa_constraints.builder import build  # noqa: E402
from vqa_constraints.validation import validate_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    build_times, validate_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            out = Path(tmp) / f"build-{repeat}"
            started = time.perf_counter()
            report = build(out, sources=["flags", "planted"], seed=0)
            build_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            violations = validate_folder(out)
            validate_times.append(time.perf_counter() - started)
            assert not violations, violations[:3]
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    rows = sum(report.rows.values())
    print(f"cpu cores: {os.cpu_count()}")
    print(f"rows: {rows} ({', '.join(f'{k} {v}' for k, v in sorted(report.rows.items()))})")
    print(f"build flags+planted: median {statistics.median(build_times):.2f}s over {args.repeats} "
          f"(min {min(build_times):.2f}s, max {max(build_times):.2f}s); {size / 1e6:.1f} MB on disk")
    print(f"validate: median {statistics.median(validate_times):.2f}s")


if __name__ == "__main__":
    main()
