"""The functions the VQA-Constraints lmms-eval tasks name (``!function utils.x`` in the YAML files).

Self-contained (standard library only), so the folder can be copied into lmms-eval's ``lmms_eval/tasks/`` as it is.
The prompt suffix, answer cleaning and matcher are copies of VQA-Constraints' own (``ANSWER_INSTRUCTION`` in
harness/models/prompting.py; ``normalize_answer``, ``answer_correct``, ``exact_match`` and ``clean_generation`` in
harness/scoring.py): tests/test_lmms_eval_task.py checks that they score every bundled question exactly as the
harness does, so an lmms-eval run and `vqa-constraints evaluate` agree question by question.
"""

from __future__ import annotations

import math
import os
import re
import string

# Where the questions are read from: a release's Hub id by default, or any `vqa-constraints build --out DIR`
# folder named by the environment variable. The YAML reads it as ``dataset_path: !function utils.DATASET_PATH``:
# lmms-eval's ``!function`` tag returns any attribute of this module, so the value is taken when lmms-eval
# loads the task (no edit of the YAML).
DATASET_PATH_ENV = "VQA_CONSTRAINTS_DATASET_PATH"
DEFAULT_DATASET_PATH = "ORG/vqa-constraints"
DATASET_PATH = os.environ.get(DATASET_PATH_ENV, "").strip() or DEFAULT_DATASET_PATH

# The instruction after every question (the harness's ANSWER_INSTRUCTION).
ANSWER_INSTRUCTION = "Answer in a few words."

# The harness's fallback prompt ("USER: <image>\n{question} Answer in a few words. ASSISTANT:") as a chat
# template, for models that ship none: lmms-eval's llava_hf would otherwise add Vicuna's system prompt.
# Pass it as --model_args chat_template=...; it holds no ',' or '=' so lmms-eval's argument parser keeps it whole.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}USER: {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Extra views of the subject (lists of images) are not asked about; dropping them keeps logged samples small.
UNUSED_COLUMNS = ("other_views",)

# --- answer matching (SQuAD-style normalisation, then whole-word containment) ---------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, delete punctuation ("U.S.A." -> "usa"), drop a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_correct(prediction: str, answers) -> bool:
    """True when some gold answer, normalised, occurs in the normalised prediction as whole words."""
    padded = f" {normalize_answer(prediction)} "
    for answer in answers:
        gold = normalize_answer(answer)
        if gold and f" {gold} " in padded and _leading_mark_kept(prediction, answer):
            return True
    return False


def _leading_mark_kept(prediction: str, answer: str) -> bool:
    """A gold answer that starts with a mark (".ki", "+686") needs that mark in the prediction: normalising drops
    punctuation, and the bare word ("ki") is another answer."""
    head = re.match(r"\s*([^\w\s]+\w+)", answer)
    if head is None:
        return True
    return re.search(r"(?<![\w])" + re.escape(head.group(1).lower()) + r"(?!\w)", prediction.lower()) is not None


def exact_match(prediction: str, answers) -> bool:
    """True when the normalised prediction equals some normalised gold answer."""
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(answer) for answer in answers)


def clean_generation(text: str) -> str:
    """The answer part of a decoded generation: up to the first newline, stripped."""
    return text.strip().split("\n", 1)[0].strip()


# --- the task's functions --------------------------------------------------------------------------------------


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
    `vqa-constraints leaderboard prepare --from-lmms-eval` needs the id to find the question in the build.
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


if __name__ == "__main__":  # `python integrations/lmms_eval/utils.py`: the chat template, for --model_args
    print(LLAVA_HF_CHAT_TEMPLATE)
