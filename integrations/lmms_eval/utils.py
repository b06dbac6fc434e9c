"""The functions the VQA-Constraints lmms-eval tasks name (``!function utils.x`` in the YAML files).

Prompts, answer cleaning and matching are this project's own (harness/models/prompting.py,
harness/scoring.py), so an lmms-eval run scores a question exactly as `vqa-constraints evaluate`
does. lmms-eval itself is not imported: tests/test_lmms_eval_task.py checks the contract without it.
"""

from __future__ import annotations

import math

from harness.models.prompting import ANSWER_INSTRUCTION
from harness.scoring import answer_correct, clean_generation, exact_match

# The harness's fallback prompt ("USER: <image>\n{question} Answer in a few words. ASSISTANT:") as a chat
# template, for models that ship none: lmms-eval's llava_hf would otherwise add Vicuna's system prompt.
# Pass it as --model_args chat_template=...; it holds no ',' or '=' so lmms-eval's argument parser keeps it whole.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}USER: {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Extra views of the subject (lists of images) are not asked about; dropping them keeps logged samples small.
UNUSED_COLUMNS = ("other_views",)


def process_docs(dataset):
    return dataset.remove_columns([c for c in UNUSED_COLUMNS if c in dataset.column_names])


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question plus the harness's instruction; the model class adds the image token and chat template."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', ' ' + ANSWER_INSTRUCTION)}"


def doc_to_target(doc):
    return doc["answers"][0]


def process_results(doc, results):
    """Per-question scores; the constraint type rides along so the breakdown can be aggregated.

    The question id rides along too: lmms-eval 0.7 logs these values but not the doc, and
    `leaderboard prepare --from-lmms-eval` needs the id to find the question in the build.
    """
    prediction = clean_generation(results[0])
    correct = answer_correct(prediction, doc["answers"])
    by_type = {"id": doc["id"], "constraint_types": doc["constraint_types"], "correct": correct}
    return {
        "accuracy": float(correct),
        "exact_match": float(exact_match(prediction, doc["answers"])),
        "accuracy_visual": by_type,
        "accuracy_visual_textual": by_type,
    }


def _mean_of_type(items, constraint_types: str) -> float:
    chosen = [item["correct"] for item in items if item["constraint_types"] == constraint_types]
    # NaN, not 0: a config without such questions has no accuracy on them.
    return sum(chosen) / len(chosen) if chosen else math.nan


def mean_visual(items) -> float:
    """Accuracy on questions whose only constraint is the image."""
    return _mean_of_type(items, "visual")


def mean_visual_textual(items) -> float:
    """Accuracy on questions with the image plus textual constraints."""
    return _mean_of_type(items, "visual+textual")
