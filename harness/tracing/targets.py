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

The forced prefix must not hand the corrupted run what the corruption removes.
flag-llava's prefix "The capital of Afghanistan is " names the country the image
shows; fed unchanged to the corrupted run, it lets the model read the capital off
its own words and the image looks irrelevant. ``bridge_positions`` are the
prefix tokens that name the subject (or another bridge entity the row names);
the tracer corrupts them together with the constraint (``--prefix-subject
corrupt``, the default), so the answer target measures retrieval with the
subject removed from every route, and each row says which hop it traced.
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
    # Tokens of the forced prefix that name the subject or another bridge entity ("Afghanistan" in
    # "The capital of Afghanistan is "): what a corrupted run must not be handed.
    bridge_positions: tuple[int, ...] = ()

    @property
    def predicting_position(self) -> int:
        """The position whose next-token distribution predicts the target's first token."""
        return self.encoded.last_position

    @property
    def hop(self) -> str:
        """Which step the target measures: ``recognition`` (the subject itself), ``retrieval`` (the answer
        after a prefix that names the subject) or ``direct`` (the answer with no bridge in the prefix)."""
        if self.mode == "subject":
            return "recognition"
        return "retrieval" if self.bridge_positions else "direct"

    def record(self, token_ids: list[int]) -> dict:
        """Per-row description (traces.parquet); ``token_ids``: the tokens actually scored."""
        return {"target_mode": self.mode, "answer_source": self.source, "answer_prefix": self.prefix,
                "answer_text": self.text, "answer_tokens": list(token_ids), "hop": self.hop,
                "bridge_positions": list(self.bridge_positions),
                "predicting_position": int(self.predicting_position)}


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


def bridge_spans(prefix: str, bridges) -> list[tuple[int, int]]:
    """Character spans of ``prefix`` where a bridge entity (the subject, ...) is named, matched as the
    answer matcher matches: case and punctuation aside, whole words ("Afghanistan's" names Afghanistan)."""
    spans = []
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", prefix)]
    for bridge in bridges:
        wanted = normalize_answer(bridge).split()
        if not wanted:
            continue
        for i, (start, _) in enumerate(words):
            if not normalize_answer(prefix[start:words[i][1]]):
                continue  # an article or a dash is not part of the name
            for j in range(i, len(words)):
                got = normalize_answer(prefix[start:words[j][1]]).split()
                possessive = got[:-1] == wanted[:-1] and got[-1:] == [wanted[-1] + "s"]  # "Afghanistan's"
                if got == wanted or possessive:
                    spans.append((start, words[j][1]))
                if len(got) >= len(wanted):
                    break
    return sorted(set(spans))


def choose_target(adapter, question: str, image, answers, prediction: str | None, mode: str,
                  answer_scoring: str = "first-token", bridges=()) -> Target:
    """The traced target of one question (``prediction``: the model's greedy answer; ``bridges``: the
    entities the question is about, whose mention in the forced prefix is marked in ``bridge_positions``)."""
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
                spans = [(encoded.answer_start + a, encoded.answer_start + b) for a, b in bridge_spans(prefix, bridges)]
                named = tuple(q for q in encoded.answer_positions if q < gold_positions[0] and any(
                    encoded.token_char_spans[q][0] < b and encoded.token_char_spans[q][1] > a for a, b in spans))
                return Target(mode, "gold", prefix, gold, replace(encoded, answer_positions=gold_positions),
                              encoded.answer_positions[0] - 1, named)
    if answer_scoring == "full" and (prediction or answers):
        text = prediction or answers[0]
        encoded = encode(text)
        return Target(mode, "own-answer", "", text, encoded, encoded.last_position)
    return Target(mode, "own-first-token", "", "", bare, bare.last_position)
