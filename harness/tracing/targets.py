"""What a trace scores: the traced target of one question, chosen and described.

``answer`` (the default): the gold answer's tokens, teacher forced where the
answer begins in the model's own greedy output. flag-llava answers "The capital
of Afghanistan is Kabul."; its first token "The" says nothing about the fact, so
the prefix "The capital of Afghanistan is " is forced and p(" Kabul") is traced.
Where the answer begins is found with the harness's answer matcher
(``harness.scoring.normalize_answer``: the same whole-word match that scores
the answer correct). When the output holds no gold answer (a wrong answer under
``--traced all``) the target falls back to the model's own top first token,
and the row says so (``answer_source``).

``subject``: the same, with the question's subject (the pictured country) in
place of the gold answer: for a model that names the country before answering
("The capital of Afghanistan is Kabul.") this traces the recognition step,
p(" Afghanistan") after "The capital of", rather than the retrieval step.

``first-token``: the model's own top first token (``--answer full``: its whole
greedy answer), as before answer-aware targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from harness.models.base import Encoded
from harness.scoring import normalize_answer

TARGETS = ("answer", "subject", "first-token")
SOURCES = ("gold", "own-first-token", "own-answer")


@dataclass(frozen=True)
class Target:
    """The traced target of one question: ``encoded`` scores exactly its tokens (``answer_positions``)."""

    mode: str  # answer | subject | first-token
    source: str  # gold: a gold answer (the subject, for mode subject) found in the output; own-first-token / own-answer: the model's own
    prefix: str  # the model's own words forced before the target ("" for none)
    text: str  # the target's text as teacher forced ("" for the model's own top first token)
    encoded: Encoded  # prompt + prefix + text; answer_positions = the target's tokens only (none: top token)
    prompt_last: int  # the prompt's last token (the "last token" restoration target)

    def record(self, token_ids: list[int]) -> dict:
        """Per-row description (traces.parquet); ``token_ids``: the tokens actually scored."""
        return {"target_mode": self.mode, "answer_source": self.source, "answer_prefix": self.prefix,
                "answer_text": self.text, "answer_tokens": list(token_ids)}


def answer_start(prediction: str, answers) -> tuple[int, str] | None:
    """(char offset in ``prediction`` where a gold answer begins as whole words, that answer), or None.

    The earliest word at which the normalised rest of the prediction starts with a normalised gold
    answer; leading articles/punctuation words are stepped over ("is the Kabul" starts at "Kabul")
    unless the gold answer starts with one.
    """
    golds = [(normalize_answer(a), a) for a in answers if normalize_answer(a)]
    starts = [m.start() for m in re.finditer(r"\S+", prediction)]
    for i, start in enumerate(starts):
        rest = f"{normalize_answer(prediction[start:])} "
        for gold, answer in golds:
            if rest.startswith(f"{gold} "):
                # Words that normalise to nothing ("the", "—") are not part of the entity, unless the gold
                # answer itself starts with one ("The Hague").
                keeps_article = not normalize_answer(answer.split()[0])
                while not keeps_article and i + 1 < len(starts) and not normalize_answer(prediction[starts[i]:starts[i + 1]]):
                    i += 1
                return starts[i], answer
    return None


def choose_target(adapter, question: str, image, answers, prediction: str | None, mode: str,
                  answer_scoring: str = "first-token") -> Target:
    """The traced target of one question (``prediction``: the model's greedy answer)."""
    def encode(answer):
        return adapter.encode(question, answer=answer) if image is None else adapter.encode(question, image, answer=answer)

    bare = encode(None)
    if mode in ("answer", "subject") and prediction is not None:
        found = answer_start(prediction, answers)
        if found is not None:
            start, gold = found
            prefix = prediction[:start]
            encoded = encode(prefix + gold)
            begin = encoded.answer_start + len(prefix)
            # The gold answer's tokens: those overlapping its characters (a token may carry the space before it).
            gold_positions = [q for q in encoded.answer_positions
                              if encoded.token_char_spans[q][1] > begin and encoded.token_char_spans[q][0] < begin + len(gold)]
            if gold_positions:
                return Target(mode, "gold", prefix, gold, replace(encoded, answer_positions=gold_positions),
                              encoded.answer_positions[0] - 1)
    if answer_scoring == "full" and (prediction or answers):
        text = prediction or answers[0]
        encoded = encode(text)
        return Target(mode, "own-answer", "", text, encoded, encoded.last_position)
    return Target(mode, "own-first-token", "", "", bare, bare.last_position)
