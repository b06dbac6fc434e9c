"""How a question becomes prompt text.

A processor with a chat template renders it; otherwise these documented
fallbacks (LLaVA-1.5's own format, plus the paper's "answer in a few words")
are used. The planted zoo model is trained on exactly the fallback format.
"""

IMAGE_PLACEHOLDER = "<image>"
FALLBACK_TEMPLATE = "USER: <image>\n{question} Answer in a few words. ASSISTANT:"
TEXT_ONLY_FALLBACK_TEMPLATE = "USER: {question} Answer in a few words. ASSISTANT:"


def fallback_prompt(question: str, with_image: bool = True) -> tuple[str, int]:
    """The fallback prompt and the char offset where ``question`` starts in it."""
    template = FALLBACK_TEMPLATE if with_image else TEXT_ONLY_FALLBACK_TEMPLATE
    prefix = template.split("{question}")[0]
    return template.format(question=question), len(prefix)

# The instruction every prompt carries after the question (fallback and chat templates alike).
ANSWER_INSTRUCTION = "Answer in a few words."
# Stands in for the question while a chat template renders, so its offset can be found
# whatever the template adds around it.
_QUESTION_SENTINEL = "\u2063QUESTION\u2063"


def chat_template_prompt(
    renderer, question: str, with_image: bool = True, image_entry: dict | None = None, string_content: bool = False
) -> tuple[str, int]:
    """Render ``question`` with ``renderer``'s chat template (a processor or tokenizer).

    The user turn holds the image (when ``with_image``) and then the question
    followed by ``ANSWER_INSTRUCTION``; a generation prompt is added. Returns
    the prompt and the char offset of the question in it. ``string_content``
    passes the user text as a plain string (text-only LM templates expect that).
    """
    text = f"{_QUESTION_SENTINEL} {ANSWER_INSTRUCTION}"
    content: list[dict] | str
    if string_content:
        content = text
    else:
        content = [image_entry or {"type": "image"}] if with_image else []
        content.append({"type": "text", "text": text})
    rendered = renderer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    if isinstance(rendered, list):  # some processors return one string per conversation
        rendered = rendered[0]
    start = rendered.find(_QUESTION_SENTINEL)
    if start < 0 or rendered.count(_QUESTION_SENTINEL) != 1:
        raise ValueError("the chat template does not place the user's text exactly once in the prompt")
    return rendered.replace(_QUESTION_SENTINEL, question), start


def answer_separator(prompt: str) -> str:
    """What goes between a prompt and its answer: nothing after whitespace (``"assistant\\n"``), else a space."""
    return "" if not prompt or prompt[-1].isspace() else " "
