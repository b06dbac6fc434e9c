"""Compare an lmms-eval run of the vqa_constraints tasks with a `vqa-constraints evaluate` run, question by question.

    python integrations/lmms_eval/compare.py LMMS_EVAL_LOG_DIR RUN_DIR --data BUILD [--split test]

Prints how many questions both scored, how many agree on correctness and on the answer text,
and every disagreement (id, both answers). Exit code 1 when any correctness differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.leaderboard.from_lmms_eval import read_logged, samples_files, samples_from_logged
from vqa_constraints.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    theirs, _ = samples_from_logged(read_logged(samples_files([args.logs])), args.data, args.split)
    ours = {s["id"]: s for s in map(json.loads, (args.run_dir / "samples.jsonl").read_text().splitlines())}
    both = [s for s in theirs if s["id"] in ours]
    correct_differs = [s for s in both if s["correct"] != ours[s["id"]]["correct"]]
    text_differs = [s for s in both if s["prediction"] != ours[s["id"]]["prediction"]]
    print(f"questions: lmms-eval {len(theirs)}, evaluate {len(ours)}, both {len(both)}")
    print(f"accuracy: lmms-eval {sum(s['correct'] for s in both) / max(len(both), 1):.4f}, "
          f"evaluate {sum(ours[s['id']]['correct'] for s in both) / max(len(both), 1):.4f}")
    print(f"same correctness: {len(both) - len(correct_differs)}/{len(both)}; "
          f"same answer text: {len(both) - len(text_differs)}/{len(both)}")
    for s in text_differs:
        mark = "CORRECTNESS DIFFERS" if s in correct_differs else "text differs"
        print(f"  {mark} {s['id']}: lmms-eval {s['prediction']!r} vs evaluate {ours[s['id']]['prediction']!r}")
    return 1 if correct_differs else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        sys.exit(f"error: {error}")
