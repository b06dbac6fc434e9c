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
