"""Questions per second of `vqa-constraints evaluate` against lmms-eval on the same questions, model and batch size.

    python benchmarks/throughput_vs_lmms_eval.py [--model DIR] [--data DIR] [--limit 40] [--repeats 3]
        [--batch-size 1] [--lmms-python /tmp/lmms-eval-venv/bin/python]

Both tools run as a whole command, as a user starts them (process start to exit: imports, data and model loading,
scoring), from the repository root, on the CPU in float32 unless --device says otherwise: `vqa-constraints evaluate
--scoring generate` (greedy generation, what lmms-eval's generate_until does) and lmms-eval's `llava_hf` class on the
`vqa_constraints_all` group of integrations/lmms_eval with the harness's prompt as chat template (docs/lmms-eval.md).
lmms-eval runs from its own environment (--lmms-python; integrations/lmms_eval/run_end_to_end.sh makes one). Each
repeat runs both, into fresh folders; the ratio is the median over repeats of ours / theirs in questions per second.
Every repeat checks, question by question, that both give the same correctness (exit code 1 otherwise). The model
defaults to the planted zoo model, the data to a fresh `build --sources planted`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "integrations" / "lmms_eval"


def timed(command: list[str], env: dict, log: Path) -> float:
    """Wall-clock seconds of one command run to completion from the repository root; its output goes to ``log``."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"error: `{' '.join(command[:4])} ...` exited {result.returncode}; see {log}")
    return seconds


def ours_command(args, out: Path) -> list[str]:
    return [sys.executable, "-c", "from vqa_constraints.cli import main; main()", "evaluate", "--model", args.model,
            "--data", args.data, "--scoring", "generate", "--batch-size", str(args.batch_size), "--limit",
            str(args.limit), "--dtype", args.dtype, "--device", args.device, "--no-progress", "--out", str(out)]


def lmms_command(args, out: Path) -> list[str]:
    from transformers import AutoTokenizer

    model_args = f"pretrained={args.model},device={args.device},device_map={args.device},dtype={args.dtype}"
    if AutoTokenizer.from_pretrained(args.model).chat_template is None:
        # The harness prompts a model without a chat template as "USER: <image>\n{question} ... ASSISTANT:";
        # llava_hf would add Vicuna's system prompt instead (docs/lmms-eval.md).
        template = subprocess.run([args.lmms_python, str(TASK_DIR / "utils.py")], capture_output=True, text=True,
                                  check=True).stdout.strip()
        model_args += f",chat_template={template}"
    return [args.lmms_python, "-m", "lmms_eval", "--model", "llava_hf", "--force_simple", "--model_args", model_args,
            "--tasks", "vqa_constraints_all", "--include_path", "integrations/lmms_eval", "--batch_size",
            str(args.batch_size), "--limit", str(args.limit), "--log_samples", "--output_path", str(out)]


def compare(ours_dir: Path, lmms_dir: Path) -> tuple[int, int, int]:
    """(questions both scored, same correctness, same answer text); the lmms-eval answers rescored by the harness."""
    from harness.leaderboard.from_lmms_eval import read_logged, samples_files
    from harness.scoring import answer_correct, clean_generation

    ours = {s["id"]: s for s in map(json.loads, (ours_dir / "samples.jsonl").read_text().splitlines())}
    both = same_correct = same_text = 0
    for _, qid, answer, entry in read_logged(samples_files([lmms_dir])):
        mine = ours.get(qid)
        if mine is None:
            continue
        both += 1
        prediction = clean_generation(answer)
        # Their own score (utils.process_results) and the harness's matcher on their text must both agree with ours.
        theirs = entry.get("accuracy") == 1.0
        same_correct += theirs == mine["correct"] == answer_correct(prediction, mine["answers"])
        same_text += prediction == mine["prediction"]
    return both, same_correct, same_text


def default_model() -> str:
    from harness.zoo.planted import build

    return str(build())


def default_data(folder: Path) -> str:
    from vqa_constraints.builder import build

    build(folder / "planted", sources=["planted"], seed=0)
    return str(folder / "planted")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the planted zoo model)")
    parser.add_argument("--data", default=None, help="build folder (default: a fresh planted build)")
    parser.add_argument("--limit", type=int, default=40, help="questions per config (both tools' --limit)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1, help="both tools' batch size (lmms-eval's llava_hf: 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lmms-python", default="/tmp/lmms-eval-venv/bin/python",
                        help="python of a virtual environment with lmms-eval (run_end_to_end.sh makes one)")
    args = parser.parse_args(argv)
    if not Path(args.lmms_python).exists():
        sys.exit(f"error: --lmms-python {args.lmms_python}: no such interpreter; make lmms-eval's environment first "
                 "(docs/lmms-eval.md)")
    work = Path(tempfile.mkdtemp(prefix="throughput-vs-lmms-eval-"))
    args.model = str(Path(args.model or default_model()).resolve())
    args.data = str(Path(args.data or default_data(work)).resolve())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VQA_CONSTRAINTS_DATASET_PATH=args.data,
               # `datasets` keys a local folder's cache by its name: one cache for this build (see docs/lmms-eval.md)
               HF_DATASETS_CACHE=str(work / "hf-datasets"))
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    print(f"model {args.model}\ndata {args.data} (--limit {args.limit} per config), batch size {args.batch_size}, "
          f"{args.device} {args.dtype}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, work folder {work}")
    ratios, failed = [], False
    for repeat in range(args.repeats):
        ours_dir, lmms_dir = work / f"ours-{repeat}", work / f"lmms-{repeat}"
        ours_seconds = timed(ours_command(args, ours_dir), env, work / f"ours-{repeat}.log")
        lmms_seconds = timed(lmms_command(args, lmms_dir), env, work / f"lmms-{repeat}.log")
        n = len((ours_dir / "samples.jsonl").read_text().splitlines())
        both, same_correct, same_text = compare(ours_dir, lmms_dir)
        ours_rate, lmms_rate = n / ours_seconds, both / lmms_seconds
        ratios.append(ours_rate / lmms_rate)
        failed |= both != n or same_correct != n
        print(f"repeat {repeat}: vqa-constraints {n} q in {ours_seconds:.1f} s = {ours_rate:.2f} q/s; lmms-eval "
              f"{both} q in {lmms_seconds:.1f} s = {lmms_rate:.2f} q/s; ratio {ratios[-1]:.2f}; same correctness "
              f"{same_correct}/{n}, same answer text {same_text}/{n}")
    print(f"median ratio (vqa-constraints / lmms-eval, questions per second) over {args.repeats}: "
          f"{statistics.median(ratios):.2f}  (min {min(ratios):.2f}, max {max(ratios):.2f})")
    if failed:
        print("error: the two tools scored different questions or gave different correctness", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
