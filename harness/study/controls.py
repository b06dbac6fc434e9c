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
  keep the route (docs/attention.md). The routed build takes about 2.5 minutes on 2 cores and is cached; ``quick``
  uses it too (for findings 2 and 4): with the fewer training steps ``quick`` gives the planted models, the
  routed model answered too few questions under its route for either positive to pass.

- finding 3 (both constraint kinds retrieved in the first half of the layers): ``early_layers_rule`` on the
  multi-constraint questions ("which city in <region> has the creature in this image visited?") of the planted
  models with facts at K = 2 (positive: MLPs after layer 2 output zero, so nothing later can be causal) and K = 4
  (null: facts may sit anywhere up to layer 4 of 6). The textual side is traced with noise on the region's
  tokens, the visual side with noise on the image (the planted model reads the picture at its last token).

- finding 4 (the constraint -> answer attention contribution predicts a wrong answer): ``failure_prediction_rule``
  on attention studies of ``planted-routed`` with its route enforced, where the answer learns the subject only
  from the visual-constraint phrase (positive: the second half of the questions reads the phrase with its
  attention odds multiplied by F4_DAMPING after it, ``DampedRoute``, a known cause of failure; null: the model
  untouched and a known random half relabelled wrong, failures nothing in the model predicts).

- finding 5 (MultEdit at the causal layer edits better than the method it is compared with): the paired,
  subject-clustered comparison of the harmonic-mean score that decides finding 5, on MultEdit runs of the planted
  model (facts at K = 2, keyed at the last prompt token where it stores them): at K against K + 1 (positive: the
  MLPs after K output zero, so an edit there cannot reach the answer) and K + 1 against K + 2 (null: neither layer
  stores anything). This controls the finding's statistics and metrics, not the comparison with fine-tuning:
  which method edits better is not something a planted model knows.

``run_controls`` writes ``controls.json`` (per finding: the known answer, the verdict on each side and its
evidence); the study's report prints the verdicts beside the model's.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from editing.metrics import paired_comparison
from editing.runner import EditOptions, edit_rows, run_editing
from harness.bootstrap import keyed_rng
from harness.models.loading import load_model
from harness.scoring import answer_correct, generate_answers
from harness.outputs import is_complete
from harness.study.findings import (
    FAILS,
    HOLDS,
    UNSURE,
    UNTESTED,
    comparison_verdict,
    describe_comparison,
    early_layers_rule,
    failure_prediction_rule,
    image_to_constraint_rule,
    retrieval_layers_rule,
)
from harness.tracing.attention_study import StudyOptions, run_attention_study
from harness.tracing.shard_merge import merge_attention
from harness.tracing.causal_trace import TraceOptions, run_trace
from harness.zoo.planted import DEFAULT_RECIPE, build
from harness.zoo.planted.routed import DEFAULT_ROUTED, DampedRoute, build_routed
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


def trace_planted(model_dir: Path, data: Path, out: Path, limit: int, config: str = "single_constraint",
                  corruption: str = "image-noise", positions: str = "last") -> Path:
    """A control's trace of one planted model, MLP restored, window 1 (reused when complete); the defaults are the
    finding-1 control's (the image corrupted, restored at the last token, where the planted model reads it)."""
    if is_complete(out / "trace_stats.json"):
        return out
    options = TraceOptions(model=str(model_dir), data=str(data), config=config, out=out, corruption=corruption,
                           kinds=("mlp",), positions=positions, window=1, limit=limit, noise_samples=3,
                           dtype="float32", device="cpu", progress=False)
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


def attention_run(adapter, split, out: Path, options: StudyOptions, route=None) -> Path:
    """A control's attention study (reused when complete), with ``route`` (a routed model's route, or a variant of
    it) enforced at inference when given."""
    if not is_complete(out / "attention_stats.json"):
        with route.enforced(adapter.model, adapter.tokenizer) if route is not None else nullcontext():
            run_attention_study(adapter, split, out, options)
    return out


def attention_planted(model_dir: Path, data: Path, out: Path, limit: int, route=None) -> Path:
    """The finding-2 control's attention run on one planted model (reused when complete, without loading it)."""
    if is_complete(out / "attention_stats.json"):
        return out
    adapter = load_model(str(model_dir), dtype="float32", device="cpu")
    split = load_split(str(data), "single_constraint", "test")
    return attention_run(adapter, split, out, StudyOptions(limit=limit, draws=5, progress=False), route)


def finding2_control(out: Path, data: Path, limit: int = 40, quick: bool = False) -> dict:
    """Build planted-routed and planted, run the attention study on each, and judge both with finding 2's rule."""
    design = ("planted-routed with its training route enforced at inference (positive: image -> constraint "
              "tokens in layers 0-1 is the answer's only path) and planted (null: reads the image at the answer); "
              "every image token cut from the constraint tokens per layer band, share of p(answer) lost")
    folders = {"positive": attention_planted(build_routed(DEFAULT_ROUTED, progress=False), data,
                                             out / "f2-routed-enforced", limit, route=DEFAULT_ROUTED.route()),
               "null": attention_planted(build(DEFAULT_RECIPE, progress=False), data, out / "f2-planted", limit)}
    sides = {}
    for side, folder in folders.items():
        verdict, evidence = image_to_constraint_rule(folder)
        sides[side] = {"runs": [folder.name], "verdict": verdict, "evidence": evidence,
                       "passes": verdict in EXPECTED[side]}
    return {"finding": "2", "design": design, **sides}


# Finding 3's two traces of one multi-constraint split: noise on the constraint tokens (the textual constraint's
# side) and on the image (the visual constraint's side), as the demo traces the models under study.
F3_TRACES = {"tokens": ("noise", "constraint"), "image": ("image-noise", "constraint")}
F3_MODELS = {"positive": "k2", "null": "k4"}


def finding3_control(out: Path, data: Path, limit: int = 40, quick: bool = False) -> dict:
    """Trace the multi-constraint questions of the planted models with facts at MLP 2 (positive: no MLP after
    layer 2 of 6 does anything, so both constraints are retrieved in the first half) and MLP 4 (null: facts may
    sit up to layer 4), both constraint kinds, and judge each with finding 3's rule."""
    recipes = planted_recipes(quick)
    sides = {}
    for side, name in F3_MODELS.items():
        model_dir = Path(build(recipes[name], progress=False))
        folders = {unit: trace_planted(model_dir, data, out / f"f3-{name}-{unit}", limit, "multi_constraint",
                                       corruption, positions)
                   for unit, (corruption, positions) in F3_TRACES.items()}
        verdict, evidence = early_layers_rule(folders["tokens"], folders["image"])
        sides[side] = {"runs": [folder.name for folder in folders.values()], "verdict": verdict,
                       "evidence": evidence, "passes": verdict in EXPECTED[side]}
    return {"finding": "3", "design": "planted multi-constraint questions (which city in a region the pictured "
                                      "creature visited), facts at MLP 2 (positive) and MLP 4 (null) of 6; noise on "
                                      "the region's tokens and on the image, MLP restored, window 1", **sides}


# Finding 4: the damped half's odds of reading the visual-constraint phrase after it are multiplied by this
# (at 0.05 and 0.002 too many damped answers stayed right for 5 wrong ones in the AUROC's held-out half).
F4_DAMPING = 1e-4


def mislabelled(adapter, split, limit: int, route, seed: int = 0):
    """``split``'s first ``limit`` questions, relabelled so that the wrong answers are a random half known in
    advance: there the gold answer becomes another question's answer that the model does not give; elsewhere
    the model's own answer (greedy, under ``route``, as the attention study will generate it)."""
    records = list(split.records(limit))
    with route.enforced(adapter.model, adapter.tokenizer):
        predictions = generate_answers(adapter, records)
    wrong = set(keyed_rng(seed, "f4-mislabelled").permutation(len(records))[: len(records) // 2].tolist())
    golds = [record.answers[0] for record in records]
    answers = []
    for index, prediction in enumerate(predictions):
        if index in wrong:
            others = golds[index + 1:] + golds[:index]
            # an empty gold answer never matches (answer_correct), should every other answer match this one
            answers.append([next((a for a in others if not answer_correct(prediction, [a])), "")])
        else:
            answers.append([prediction.strip()])
    rows = split.rows.select(range(len(records))).remove_columns("answers").add_column("answers", answers)
    return replace(split, rows=rows)


def finding4_control(out: Path, data: Path, limit: int = 40, quick: bool = False) -> dict:
    """Run the attention study on planted-routed with its route enforced (the answer learns the subject only from
    the visual-constraint phrase) and judge both sides with finding 4's rule: positive, the second half of the
    questions reads the phrase with its attention odds multiplied by F4_DAMPING (a known cause of failure that
    lowers the constraint -> answer contribution); null, the model untouched and a random half of the questions
    relabelled wrong (failures that nothing in the model can predict)."""
    design = (f"planted-routed with its route enforced; positive: in the second half of the questions the "
              f"positions after the visual-constraint phrase read it with their attention odds multiplied by "
              f"{F4_DAMPING:g} (every layer); null: a random half relabelled wrong; AUROC of the constraint -> answer "
              f"contribution on the held-out half")
    adapter = load_model(str(build_routed(DEFAULT_ROUTED, progress=False)), dtype="float32", device="cpu")
    split = load_split(str(data), "single_constraint", "test")
    route = DEFAULT_ROUTED.route()
    damped = DampedRoute(route.open_layers, F4_DAMPING)
    halves = [attention_run(adapter, split, out / "f4-damped-shards" / f"{i}",
                            StudyOptions(limit=limit, draws=1, progress=False, shard=f"{i}/2"), r)
              for i, r in ((0, route), (1, damped))]
    positive = out / "f4-damped"
    if not is_complete(positive / "attention_stats.json"):
        merge_attention(halves, positive)
    null = out / "f4-mislabelled"
    if not is_complete(null / "attention_stats.json"):
        attention_run(adapter, mislabelled(adapter, split, limit, route), null,
                      StudyOptions(limit=limit, draws=1, progress=False), route)
    sides = {}
    for side, folder in (("positive", positive), ("null", null)):
        verdict, evidence = failure_prediction_rule(folder)
        sides[side] = {"runs": [folder.name], "verdict": verdict, "evidence": evidence,
                       "passes": verdict in EXPECTED[side]}
    return {"finding": "4", "design": design, **sides}


# Finding 5's sides, as layer offsets from K: (the edited layer, the layer of the edit it is compared against).
F5_LAYERS = {"positive": (0, 1), "null": (1, 2)}


def edit_planted(model_dir: Path, data: Path, out: Path, layer: int, limit: int) -> Path:
    """One finding-5 control run: MultEdit keyed at the last prompt token (where the planted model stores its
    facts), long-tail facts inserted one at a time at ``layer`` (reused when complete)."""
    if is_complete(out / "editing_results.json"):
        return out
    adapter = load_model(str(model_dir), dtype="float32", device="cpu")
    options = EditOptions(methods=["multedit"], track="insertion", layers=[layer], key_position="last", limit=limit,
                          specificity_size=16, neighbours=8, validation_size=4)
    run_editing(adapter, str(data), out, options)
    return out


def finding5_control(out: Path, data: Path, limit: int = 40, quick: bool = False) -> dict:
    """Edit the planted model (facts at MLP K = 2) at K, K + 1 and K + 2 and judge the paired comparisons with
    finding 5's verdict: at K against K + 1 (positive: MLPs after K output zero, so an edit there cannot reach the
    answer) and K + 1 against K + 2 (null: two layers that store nothing; neither may be called better)."""
    recipe = planted_recipes(quick)["k2"]
    model_dir = Path(build(recipe, progress=False))
    planted = recipe.planted_layer
    layers = sorted({planted + offset for pair in F5_LAYERS.values() for offset in pair})
    folders = {layer: edit_planted(model_dir, data, out / f"f5-layer{layer}", layer, limit) for layer in layers}
    sides = {}
    for side, (edited, against) in F5_LAYERS.items():
        a, b = planted + edited, planted + against
        entry = paired_comparison(edit_rows(folders[a], "multedit"), edit_rows(folders[b], "multedit"), 0,
                                  f"multedit at layer {a}", f"multedit at layer {b}")
        verdict = comparison_verdict(entry)
        sides[side] = {"runs": [folders[a].name, folders[b].name], "verdict": verdict,
                       "evidence": describe_comparison("insertion", entry), "passes": verdict in EXPECTED[side]}
    return {"finding": "5", "design": "MultEdit keyed where the planted model stores its facts (last prompt token), "
                                      f"long-tail facts inserted one at a time at MLP {planted} (the planted layer), "
                                      f"{planted + 1} and {planted + 2} (silent MLPs); paired harmonic-mean score, "
                                      "subjects resampled", **sides}


CONTROLS = {"1": finding1_control, "2": finding2_control, "3": finding3_control, "4": finding4_control,
            "5": finding5_control}


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
    path = out / CONTROLS_FILE
    results = {}
    if findings is not None and path.exists():
        # a run of some findings keeps the others' verdicts from an earlier run with the same settings
        earlier = json.loads(path.read_text())
        if (earlier.get("quick"), earlier.get("limit")) == (quick, limit):
            results = dict(earlier.get("controls", {}))
    results.update({number: control(out, data, limit=limit, quick=quick) for number, control in CONTROLS.items()
                    if findings is None or number in findings})
    document = {"schema_version": SCHEMA_VERSION, "complete": True, "quick": quick, "limit": limit,
                "controls": dict(sorted(results.items()))}
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
           "finding3_control", "finding4_control", "finding5_control", "run_controls"]
