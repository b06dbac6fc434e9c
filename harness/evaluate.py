"""Score a model on VQA-Constraints: one question from the data to one line of samples.jsonl.

``evaluate(EvalOptions(...))`` is the whole evaluation; ``vqa-constraints
evaluate`` only parses flags into ``EvalOptions``. The order of work is:
load the configs, fix the ordered question list (and this shard's slice of it),
open or resume the run folder, score the missing questions batch by batch
(each batch appended and flushed), then write results.json and print a table.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import datasets
import numpy
import torch
import transformers
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from harness import scoring
from harness.models.loading import load_model, local_revision
from harness.outputs import check_out
from harness.results import compute_metrics
from harness.runs import (
    RUN_FILE,
    RUN_FORMAT_VERSION,
    SAMPLES_FILE,
    RunFolder,
    check_run_folder,
    schema_errors,
    write_json_atomic,
)
from harness.scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from harness.shards import parse_shard
from harness.vllm_backend import VLLMBackend, vllm_dtype
from vqa_constraints import CONFIGS, __version__
from vqa_constraints.errors import UserError
from vqa_constraints.loading import LoadedSplit, load_split
from vqa_constraints.records import Record, sha256_hex

log = logging.getLogger(__name__)

SCORING_MODES = ("generate", "logprob", "both")
BACKENDS = ("hf", "vllm")
RESULTS_FORMAT_VERSION = 1


@dataclass
class EvalOptions:
    model: str
    data: str
    out: Path
    configs: list[str] | None = None  # None: every config the build has
    split: str = "test"
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None  # per config
    scoring: str = "both"
    backend: str = "hf"
    shard: str | None = None  # "I/N"
    seed: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None  # accelerate placement over several GPUs (hf back-end)
    max_pixels: int | None = None  # image pixel budget for dynamic-resolution models; None: the default cap
    tensor_parallel_size: int = 1  # GPUs per model (vllm back-end)
    revision: str | None = None
    data_revision: str | None = None
    trust_remote_code: bool = False
    progress: bool = True
    show_table: bool = True
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One question to score: where it is (config, row) and its id."""

    config: str
    index: int
    id: str


def check_options(options: EvalOptions) -> None:
    if options.scoring not in SCORING_MODES:
        raise UserError(f"--scoring {options.scoring!r}: choose from {', '.join(SCORING_MODES)}")
    if options.backend not in BACKENDS:
        raise UserError(f"--backend {options.backend!r}: choose from {', '.join(BACKENDS)}")
    if options.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        # before the run folder is made: nothing half-written
        raise UserError("--backend vllm: vLLM is not installed (pip install 'vqa-constraints[vllm]' on a CUDA machine)")
    if options.max_pixels is not None and options.max_pixels < 1:
        raise UserError(f"--max-pixels {options.max_pixels}: must be at least 1")
    if options.tensor_parallel_size < 1:
        raise UserError(f"--tensor-parallel-size {options.tensor_parallel_size}: must be at least 1")
    if options.tensor_parallel_size > 1 and options.backend != "vllm":
        raise UserError("--tensor-parallel-size is for --backend vllm; with --backend hf use --device-map auto")
    if options.device_map is not None and options.backend == "vllm":
        raise UserError("--device-map is for --backend hf; vLLM spreads a model with --tensor-parallel-size")
    if options.batch_size < 1:
        raise UserError(f"--batch-size {options.batch_size}: must be at least 1")
    if options.limit is not None and options.limit < 1:
        raise UserError(f"--limit {options.limit}: must be at least 1")
    if options.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {options.max_new_tokens}: must be at least 1")
    for config in options.configs or []:
        if config not in CONFIGS:
            raise UserError(f"--config {config!r}: unknown config; choose from {', '.join(CONFIGS)}")


def default_configs(data: str) -> list[str]:
    path = Path(data)
    if path.is_dir():
        present = [c for c in CONFIGS if (path / c).is_dir()]
        if not present:
            raise UserError(f"{data}: not a VQA-Constraints build (no folder for any of {', '.join(CONFIGS)})")
        return present
    return list(CONFIGS)


def load_splits(options: EvalOptions) -> dict[str, LoadedSplit]:
    configs = list(dict.fromkeys(options.configs or default_configs(options.data)))
    return {c: load_split(options.data, c, options.split, revision=options.data_revision) for c in configs}


def plan_tasks(splits: dict[str, LoadedSplit], limit: int | None) -> list[Task]:
    """The ordered question list: configs in the order given, rows in file order, ``limit`` per config."""
    tasks = []
    for config, split in splits.items():
        count = len(split) if limit is None else min(limit, len(split))
        ids = split.rows.select(range(count))["id"] if count else []
        tasks.extend(Task(config, index, id_) for index, id_ in enumerate(ids))
    return tasks


def check_rows(data: str, splits: dict[str, LoadedSplit], tasks: list[Task]) -> None:
    """Refuse, before any model loads, a row whose sample line would break samples.schema.json (and that
    ``vqa-constraints validate`` rejects): an empty question, no answers or an empty answer."""
    for config, split in splits.items():
        indices = [t.index for t in tasks if t.config == config]
        if not indices:
            continue
        columns = split.rows.select_columns(["id", "question", "answers"]).select(indices).to_dict()
        for index, qid, question, answers in zip(indices, columns["id"], columns["question"], columns["answers"]):
            where = f"{data} config {config!r} row {index} (question {qid})"
            if not isinstance(question, str) or not question.strip():
                raise UserError(f"{where} field 'question': empty; run `vqa-constraints validate {data}`")
            if not answers or any(not isinstance(a, str) or not a.strip() for a in answers):
                raise UserError(f"{where} field 'answers': empty or holds an empty answer; "
                                f"run `vqa-constraints validate {data}`")


def model_fingerprint(model: str) -> str | None:
    """For a local folder, the same sha256 revision ``load_model`` records (config + weights); None for Hub ids."""

    path = Path(model).expanduser()
    return local_revision(path) if path.is_dir() else None


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, if it is one."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def library_versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": numpy.__version__,
        "vqa_constraints": __version__,
    }


def load_adapter(options: EvalOptions):
    adapter = load_model(
        options.model,
        dtype=options.dtype,
        device=options.device,
        trust_remote_code=options.trust_remote_code,
        revision=options.revision,
        device_map=options.device_map,
        max_pixels=options.max_pixels,
    )
    check_takes_images(adapter, options.model)
    return adapter


def check_takes_images(adapter, model: str) -> None:
    if not getattr(adapter, "is_multimodal", False):
        raise UserError(
            f"--model {model}: {getattr(adapter, 'family', 'this model')} is a text-only model; "
            "VQA-Constraints questions need a model that takes images"
        )


def prompt_hash(prompt_text: str, record: Record) -> str:
    """What the model saw: the prompt text and the image, hashed (16 hex chars)."""
    return sha256_hex(f"{prompt_text}\x1f{record.image_id}")[:16]


def score_batch(backend, adapter, records: list[Record], tasks: list[Task], options: EvalOptions) -> list[dict]:
    """Score one batch of records; one sample dict per record (fields null when not scored in this mode)."""
    prompts = [scoring.Prompt(r.question, r.image) for r in records]
    generations = [None] * len(records)
    answer_scores: list[list[scoring.Loglikelihood]] = [[] for _ in records]
    if options.scoring in ("generate", "both"):
        generations = backend.generate(prompts, batch_size=options.batch_size)
    if options.scoring in ("logprob", "both"):
        requests, owners = [], []
        for row, (record, prompt) in enumerate(zip(records, prompts)):
            for answer in record.answers:
                requests.append(scoring.LoglikelihoodRequest(prompt, answer))
                owners.append(row)
        for owner, result in zip(owners, backend.loglikelihood(requests, batch_size=options.batch_size)):
            answer_scores[owner].append(result)
    if options.scoring == "logprob":
        # The prompt alone, as generation would see it (a teacher-forced input may tokenize its end differently).
        next_token = backend.next_token_confidence(prompts, batch_size=options.batch_size)
    samples = []
    for task, record, generation, scores in zip(tasks, records, generations, answer_scores):
        prompt_text = adapter.build_prompt(record.question, with_image=True)[0] if adapter else backend.prompt_text(
            scoring.Prompt(record.question, record.image)
        )
        confidence = generation.confidence if generation else next_token[len(samples)]
        logprobs = [round(s.logprob, 6) for s in scores]
        samples.append(
            {
                "id": record.id,
                "config": task.config,
                "source": record.source,
                "question": record.question,
                "answers": list(record.answers),
                "constraint_types": record.constraint_types,
                "num_constraints": len(record.constraints),
                "relation": record.relation,
                "prediction": generation.text if generation else None,
                "correct": scoring.answer_correct(generation.text, record.answers) if generation else None,
                "exact": scoring.exact_match(generation.text, record.answers) if generation else None,
                "answer_logprobs": logprobs if scores else None,
                "gold_logprob": max(logprobs) if scores else None,
                "confidence": round(confidence, 6) if confidence is not None else None,
                "prompt_hash": prompt_hash(prompt_text, record),
            }
        )
    return samples


def check_sample_lines(samples: list[dict], path: Path) -> None:
    """Every line written to samples.jsonl matches samples.schema.json (the contract `leaderboard validate` reads)."""
    for sample in samples:
        errors = schema_errors("samples", sample, f"{path} question {sample.get('id')}")
        if errors:
            raise UserError(f"{errors[0]} (the question's row breaks the sample line's schema; fix the data)")


def make_backend(options: EvalOptions, adapter):
    if options.backend == "vllm":
        return VLLMBackend.from_options(options)
    return scoring.HFBackend(adapter, max_new_tokens=options.max_new_tokens)


def evaluate(options: EvalOptions, adapter=None) -> Path:
    """Run (or resume) the evaluation described by ``options``; return the run folder.

    Pass an already loaded ``adapter`` to reuse it (the demo and tests do);
    otherwise the model is loaded from ``options.model``.
    """
    check_options(options)

    check_out(options.out, "evaluate", options.model, options.data)  # the one --out rule, before any work
    shard = parse_shard(options.shard)
    started = time.time()
    splits = load_splits(options)
    all_tasks = plan_tasks(splits, options.limit)
    check_rows(options.data, splits, all_tasks)
    total = len(all_tasks)
    start, end = shard.bounds(total) if shard else (0, total)
    tasks = all_tasks[start:end]
    identity = {
        "format_version": RUN_FORMAT_VERSION,
        "model": options.model,
        "model_revision": options.revision,
        "model_fingerprint": model_fingerprint(options.model),
        "dtype": options.dtype,
        "max_pixels": options.max_pixels,
        "data": options.data,
        "data_revision": options.data_revision,
        "split": options.split,
        "configs": list(splits),
        "fingerprints": {c: s.fingerprint for c, s in splits.items()},
        "scoring": options.scoring,
        "backend": options.backend,
        "max_new_tokens": options.max_new_tokens,
        "limit": options.limit,
        "shard": str(shard) if shard else None,
        "seed": options.seed,
        "total": total,
        "start": start,
        "end": end,
    }
    # Refuse a mismatched run folder before spending minutes loading a model.
    check_run_folder(Path(options.out), identity)
    if adapter is None and options.backend == "hf":
        adapter = load_adapter(options)
    elif adapter is not None:
        check_takes_images(adapter, options.model)

    torch.manual_seed(options.seed)
    new_folder = not Path(options.out).exists()
    new_run = new_folder or not (Path(options.out) / RUN_FILE).exists()
    run = RunFolder.open(Path(options.out), identity, {t.id for t in tasks})
    done = run.done_ids()
    pending = [t for t in tasks if t.id not in done]
    scored_now = 0
    if pending:
        try:
            backend = make_backend(options, adapter)
            scored_now = _score_pending(run, backend, adapter, splits, all_tasks, pending, len(tasks), options)
        except Exception:
            if new_run:
                _discard_unscored(run, new_folder)
            raise
    samples = run.finalize_samples([t.id for t in tasks])
    finished = time.time()
    results = build_results(options, identity, samples, adapter, started, finished, scored_now, splits)
    write_json_atomic(run.results_path, results)
    if options.show_table:
        print_table(results)
    return run.path


def _discard_unscored(run: RunFolder, remove_folder: bool) -> None:
    """Undo a run folder this call created when it failed before scoring anything (an image that does not
    decode, a missing back-end): otherwise its run.json would pin the failed options and refuse the fixed rerun."""
    if run.done_ids():
        return
    for name in (SAMPLES_FILE, RUN_FILE):
        (run.path / name).unlink(missing_ok=True)
    if remove_folder and not any(run.path.iterdir()):
        run.path.rmdir()


def aligned_batches(all_tasks: list[Task], pending_ids: set[str], batch_size: int):
    """Batches fixed by position in the whole question list: ``all_tasks[k*B:(k+1)*B]``.

    Each batch that holds a pending question is yielded whole (with the ids to
    keep), so a question is always computed alongside the same neighbours:
    a resumed run or a shard gives bit-identical numbers to an uninterrupted,
    unsharded run with the same batch size.
    """
    for begin in range(0, len(all_tasks), batch_size):
        batch = all_tasks[begin : begin + batch_size]
        keep = [t.id for t in batch if t.id in pending_ids]
        if keep:
            yield batch, set(keep)


def _score_pending(run, backend, adapter, splits, all_tasks, pending: list[Task], size: int, options: EvalOptions) -> int:
    bar = tqdm(
        total=size,
        initial=size - len(pending),
        unit="q",
        desc=f"scoring {Path(options.model).name}",
        disable=not options.progress,
        dynamic_ncols=True,
    )
    try:
        for batch, keep in aligned_batches(all_tasks, {t.id for t in pending}, options.batch_size):
            records = [splits[t.config].record(t.index) for t in batch]
            samples = score_batch(backend, adapter, records, batch, options)
            check_sample_lines(samples, run.samples_path)
            run.append([sample for sample in samples if sample["id"] in keep])
            bar.update(len(keep))
    finally:
        bar.close()
    return len(pending)


def build_results(options, identity, samples, adapter, started, finished, scored_now, splits) -> dict:
    seconds = finished - started
    return {
        "format_version": RESULTS_FORMAT_VERSION,
        "package": {"name": "vqa-constraints", "version": __version__, "git_commit": git_commit()},
        "versions": library_versions(),
        "model": {
            "id": options.model,
            "name": Path(options.model).name if Path(options.model).is_dir() else options.model,
            "revision": getattr(adapter, "revision", None) or options.revision,
            "fingerprint": identity["model_fingerprint"],
            "family": getattr(adapter, "family", None),
            "dtype": dtype_used(options, adapter),
            "device": str(adapter.device) if adapter is not None else None,
            "device_map": getattr(adapter, "device_map", None),
            "max_pixels": getattr(adapter, "max_pixels", None),
        },
        "dataset": {
            "data": options.data,
            "revision": options.data_revision,
            "split": options.split,
            "configs": identity["configs"],
            "fingerprints": identity["fingerprints"],
            "files_sha256": {c: s.files_sha256 for c, s in splits.items()},  # the local files as read
            "sizes": {c: len(s) for c, s in splits.items()},
        },
        "options": {
            "scoring": options.scoring,
            "backend": options.backend,
            "batch_size": options.batch_size,
            "max_new_tokens": options.max_new_tokens,
            "decoding": "greedy (explicit config; the checkpoint's generation_config.json is ignored)",
            "tensor_parallel_size": options.tensor_parallel_size if options.backend == "vllm" else None,
            "limit": options.limit,
            "shard": identity["shard"],
            "range": [identity["start"], identity["end"]],
            "total": identity["total"],
            "seed": options.seed,
        },
        "timing": {
            "started": _iso(started),
            "finished": _iso(finished),
            "seconds": round(seconds, 3),
            "scored_this_session": scored_now,
            "questions_per_second": round(scored_now / seconds, 3) if scored_now and seconds > 0 else None,
        },
        "n": len(samples),
        "metrics": compute_metrics(samples, identity["configs"], options.seed),
    }


def dtype_used(options: EvalOptions, adapter) -> str:
    """The dtype the weights actually ran in: the loaded model's, or what vLLM was given."""
    if adapter is not None:
        return str(adapter.dtype).replace("torch.", "")
    if options.backend == "vllm":
        return vllm_dtype(options.dtype)
    return options.dtype


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def _fmt(cell: dict | None, metric: str) -> str:
    if not cell or metric not in cell or cell[metric]["value"] is None:
        return "-"
    m = cell[metric]
    if metric in ("accuracy", "exact_match"):
        return f"{100 * m['value']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"
    return f"{m['value']:.3f}"


def print_table(results: dict) -> None:
    """The per-config summary as a rich table (accuracy with its 95% interval)."""

    table = Table(title=f"{results['model']['name']} on VQA-Constraints ({results['dataset']['split']})")
    for column in ("config", "n", "acc %", "95% CI", "exact %", "visual", "vis+text", "log-prob", "conf"):
        table.add_column(column, justify="left" if column == "config" else "right", no_wrap=True)
    metrics = results["metrics"]
    for name in list(results["dataset"]["configs"]) + ["all"]:
        cell = metrics[name]
        by_type = cell["by"]["constraint_types"]
        table.add_row(
            name,
            str(cell["n"]),
            _fmt(cell, "accuracy").split(" ", 1)[0],
            _fmt(cell, "accuracy").split(" ", 1)[-1] if "accuracy" in cell else "-",
            _fmt(cell, "exact_match").split(" ")[0],
            _fmt(by_type.get("visual"), "accuracy").split(" ")[0],
            _fmt(by_type.get("visual+textual"), "accuracy").split(" ")[0],
            _fmt(cell, "gold_logprob"),
            _fmt(cell, "confidence"),
        )
    console = Console(stderr=True)
    console.width = max(console.width, 100)  # pipes report 80 columns; the table needs a little more
    console.print(table)
