"""Ground-truth controls: the study's rules run where the right verdict is known.

A readout is trusted only after it returns the known answer on a positive control and refuses on a null one.
Each control here is a pair of runs on planted models (harness/zoo/planted/), whose facts sit in one known MLP
layer K, judged by the same rule function ``harness.study.findings`` applies to the models under study:

- finding 1 (retrieved earlier on one side than the other): ``retrieval_layers_rule`` on two planted models'
  traces, facts at K = 2 and at K = 4 of 6 layers (positive: earlier on the first side), and at K = 2 under two
  training seeds (null: the same layer). Both sides are traced alike (image-noise, MLP at the last token,
  window 1), over the same questions.

- finding 2 (the image reaches the answer through the visual-constraint tokens, in early layers): the attention
  study's route rule (``attention_study.finding_2``) on ``planted-routed`` run with its training route enforced
  (positive: the answer can only travel image -> constraint tokens in layers < K = 2 of 6; ``RouteMask.enforced``)
  and on ``planted`` (null: its answer position reads the image itself). The stock routed model is not the
  positive: its answer positions' attention to the image, cut in training, is free at inference and it does not
  keep the route (docs/attention.md). The routed build takes about 25 CPU-minutes, so ``quick`` skips it.

``run_controls`` writes ``controls.json`` (per finding: the known answer, the verdict on each side and its
evidence); the study's report prints the verdicts beside the model's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from harness.models.loading import load_model
from harness.outputs import is_complete
from harness.study.findings import FAILS, HOLDS, UNSURE, UNTESTED, image_to_constraint_rule, retrieval_layers_rule
from harness.tracing.attention_study import StudyOptions, run_attention_study
from harness.tracing.causal_trace import TraceOptions, run_trace
from harness.zoo.planted import DEFAULT_RECIPE, build
from harness.zoo.planted.routed import DEFAULT_ROUTED, build_routed
from vqa_constraints.builder import build as build_dataset
from vqa_constraints.errors import UserError
from vqa_constraints.files import write_text_atomic
from vqa_constraints.loading import load_split

SCHEMA_VERSION = 1
CONTROLS_FILE = "controls.json"
# What each side of a control must give for the rule to pass: positive -> holds; null -> never holds.
EXPECTED = {"positive": (HOLDS,), "null": (FAILS, UNSURE)}


def planted_recipes(quick: bool = False) -> dict[str, object]:
    """name -> PlantedRecipe of every planted model the finding-1 control traces (world seed kept at 0, so the
    planted dataset's questions are the ones each model was taught)."""
    base = DEFAULT_RECIPE
    if quick:  # fewer steps: planted well enough for the verdict, about half the build time
        base = replace(base, phase1_steps=450, phase2_steps=200)
    return {"k2": base, "k4": replace(base, planted_layer=4), "k2-seed1": replace(base, seed=1)}


F1_PAIRS = {"positive": ("k2", "k4"), "null": ("k2", "k2-seed1")}


def trace_planted(model_dir: Path, data: Path, out: Path, limit: int, seed: int = 0) -> Path:
    """The finding-1 control's trace of one planted model (reused when complete)."""
    if is_complete(out / "trace_stats.json"):
        return out
    options = TraceOptions(model=str(model_dir), data=str(data), config="single_constraint", out=out,
                           corruption="image-noise", kinds=("mlp",), positions="last", window=1, limit=limit,
                           noise_samples=3, dtype="float32", device="cpu", progress=False, seed=seed)
    return run_trace(options)


def finding1_control(out: Path, data: Path, limit: int = 40, quick: bool = False) -> dict:
    """Build the planted models, trace each, and judge both pairs with finding 1's rule."""
    traces = {}
    for name, recipe in planted_recipes(quick).items():
        traces[name] = trace_planted(Path(build(recipe, progress=False)), data, out / f"f1-{name}", limit)
    sides = {}
    for side, (early, late) in F1_PAIRS.items():
        verdict, evidence = retrieval_layers_rule(traces[early], traces[late], labels=(early, late))
        sides[side] = {"runs": [early, late], "verdict": verdict, "evidence": evidence,
                       "passes": verdict in EXPECTED[side]}
    return {"finding": "1", "design": "planted facts at MLP layer 2 vs 4 (positive) and 2 vs 2 under another "
                                      "seed (null); image-noise, MLP restored at the last token, window 1",
            **sides}


def attention_planted(model_dir: Path, data: Path, out: Path, limit: int, enforce_route: bool) -> Path:
    """The finding-2 control's attention run on one planted model (reused when complete); ``enforce_route``: with
    the routed model's training route at inference."""
    if is_complete(out / "attention_stats.json"):
        return out
    adapter = load_model(str(model_dir), dtype="float32", device="cpu")
    split = load_split(str(data), "single_constraint", "test")
    options = StudyOptions(limit=limit, draws=5, progress=False)
    if enforce_route:
        with DEFAULT_ROUTED.route().enforced(adapter.model, adapter.tokenizer):
            run_attention_study(adapter, split, out, options)
    else:
        run_attention_study(adapter, split, out, options)
    return out


def finding2_control(out: Path, data: Path, limit: int = 40, quick: bool = False) -> dict:
    """Build planted-routed and planted, run the attention study on each, and judge both with finding 2's rule."""
    design = ("planted-routed with its training route enforced at inference (positive: image -> constraint "
              "tokens in layers 0-1 is the answer's only path) and planted (null: reads the image at the answer); "
              "every image token cut from the constraint tokens per layer band, share of p(answer) lost")
    if quick:
        skipped = {"runs": [], "verdict": UNTESTED, "passes": None,
                   "evidence": "not run with --quick: the routed build takes about 25 CPU-minutes"}
        return {"finding": "2", "design": design, "positive": skipped, "null": dict(skipped)}
    folders = {"positive": attention_planted(build_routed(DEFAULT_ROUTED, progress=False), data,
                                             out / "f2-routed-enforced", limit, enforce_route=True),
               "null": attention_planted(build(DEFAULT_RECIPE, progress=False), data, out / "f2-planted", limit,
                                         enforce_route=False)}
    sides = {}
    for side, folder in folders.items():
        verdict, evidence = image_to_constraint_rule(folder)
        sides[side] = {"runs": [folder.name], "verdict": verdict, "evidence": evidence,
                       "passes": verdict in EXPECTED[side]}
    return {"finding": "2", "design": design, **sides}


CONTROLS = {"1": finding1_control, "2": finding2_control}


def run_controls(out: Path, quick: bool = False, limit: int = 40, seed: int = 0,
                 findings: tuple[str, ...] | None = None) -> Path:
    """Run the controls of ``findings`` (default every one) into ``out`` and write ``out/controls.json``."""
    out = Path(out)
    unknown = sorted(set(findings or ()) - set(CONTROLS))
    if unknown:
        raise UserError(f"--findings {','.join(unknown)}: no control for that finding (controls: "
                        f"{', '.join(sorted(CONTROLS))})")
    data = out / "data" / "planted"
    if not (data / "README.md").exists():
        build_dataset(data, sources=["planted"], seed=seed)
    results = {number: control(out, data, limit=limit, quick=quick) for number, control in CONTROLS.items()
               if findings is None or number in findings}
    document = {"schema_version": SCHEMA_VERSION, "complete": True, "quick": quick, "limit": limit,
                "controls": results}
    path = out / CONTROLS_FILE
    write_text_atomic(path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def control_verdicts(path: Path) -> dict[str, tuple[str, str]]:
    """finding number -> (positive verdict, null verdict) from a controls.json; findings without a control:
    not tested."""
    if not Path(path).exists():
        return {}
    document = json.loads(Path(path).read_text())
    return {number: (entry["positive"]["verdict"], entry["null"]["verdict"])
            for number, entry in document.get("controls", {}).items()}


__all__ = ["CONTROLS", "EXPECTED", "UNTESTED", "control_verdicts", "finding1_control", "finding2_control",
           "run_controls"]
