"""One explicit greedy decoding (the checkpoint's generation_config.json never leaks in), and scoring that
computes the LM head only where it is read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from harness import scoring
from harness.models.loading import load_model
from harness.scoring import LoglikelihoodRequest, Prompt

# Everything a checkpoint's generation_config.json may set that would change a greedy answer.
LEAKY_DEFAULTS = {
    "do_sample": True, "temperature": 0.7, "top_k": 3, "top_p": 0.5, "repetition_penalty": 5.0,
    "no_repeat_ngram_size": 1, "min_new_tokens": 4,
}


def _prompts(n: int = 3) -> list[Prompt]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    return [Prompt(f"What is the capital of the country whose flag is in this image{'?' * (i + 1)}",
                   Image.new("RGB", (32, 32), colours[i % 4])) for i in range(n)]


@pytest.fixture(scope="module")
def leaky_pair(tiny_model_dirs, tmp_path_factory):
    """The tiny LLaVA as built, and a copy whose generation_config.json asks for sampling and penalties."""
    plain = tiny_model_dirs("llava")
    leaky = tmp_path_factory.mktemp("leaky") / "llava"
    shutil.copytree(plain, leaky)
    (leaky / "generation_config.json").write_text(json.dumps(LEAKY_DEFAULTS))
    return load_model(plain, device="cpu"), load_model(leaky, device="cpu")


def test_checkpoint_generation_config_does_not_change_answers(leaky_pair):
    plain, leaky = leaky_pair
    assert leaky.model.generation_config.repetition_penalty == 5.0  # the file was read...
    torch.manual_seed(0)
    ours = [(g.text, g.confidence) for g in scoring.generate(leaky, _prompts(), max_new_tokens=8)]
    torch.manual_seed(1)  # ...sampling would make the seed matter; greedy does not
    reference = [(g.text, g.confidence) for g in scoring.generate(plain, _prompts(), max_new_tokens=8)]
    assert [t for t, _ in ours] == [t for t, _ in reference]
    assert [c for _, c in ours] == pytest.approx([c for _, c in reference], abs=1e-6)
    # The defaults are not inert on this model: left to transformers they change the generated tokens.
    encoded = [leaky.encode(p.question, p.image) for p in _prompts()]
    batch = leaky.collate(encoded)
    width = batch["input_ids"].shape[-1]
    torch.manual_seed(0)
    default = leaky.model.generate(**batch, max_new_tokens=8, pad_token_id=leaky.pad_token_id)[:, width:]
    config = scoring.greedy_config(8, leaky.pad_token_id, scoring.stop_token_ids(leaky))
    with scoring._without_checkpoint_defaults(leaky.model):
        greedy = leaky.model.generate(**batch, generation_config=config).sequences[:, width:]
    assert not torch.equal(default, greedy)
    assert leaky.model.generation_config.repetition_penalty == 5.0  # restored after generating


def test_greedy_config_is_explicit():
    config = scoring.greedy_config(12, pad_token_id=0, eos_token_ids=[2, 7])
    assert (config.do_sample, config.num_beams, config.max_new_tokens) == (False, 1, 12)
    assert (config.repetition_penalty, config.no_repeat_ngram_size, config.min_new_tokens) == (1.0, 0, 0)
    assert config.pad_token_id == 0 and config.eos_token_id == [2, 7]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_scoring_reads_logits_only_where_needed(tiny_model_dirs, family):
    adapter = load_model(tiny_model_dirs(family), device="cpu")
    prompts = _prompts(3)
    requests = [LoglikelihoodRequest(p, answer) for p, answer in zip(prompts, ["Paris", "Tokyo capital", "Europe"])]
    head = adapter.model.get_output_embeddings()
    widths = []
    hook = head.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[-2]))
    try:
        fast = scoring.HFBackend(adapter).loglikelihood(requests, batch_size=3)
        confidence = scoring.HFBackend(adapter).next_token_confidence(prompts, batch_size=3)
    finally:
        hook.remove()
    # The LM head saw only the answer positions (and the last prompt positions), never the whole sequence.
    encoded = [adapter.encode(r.prompt.question, r.prompt.image, answer=r.continuation) for r in requests]
    assert max(widths) <= sum(len(e.answer_positions) for e in encoded) < min(e.length for e in encoded)
    # Same numbers as reading the full [batch, seq, vocab] logits.
    with torch.no_grad():
        for request, got, e in zip(requests, fast, encoded):
            logits = adapter.model(**e.inputs).logits[0].float()
            start, end = e.answer_positions[0], e.answer_positions[-1] + 1
            log_probs = torch.log_softmax(logits[start - 1 : end - 1], dim=-1)
            expected = float(log_probs.gather(-1, e.input_ids[0, start:end, None]).sum())
            assert got.logprob == pytest.approx(expected, abs=1e-5)
            assert got.num_tokens == end - start
        for prompt, got in zip(prompts, confidence):
            alone = adapter.encode(prompt.question, prompt.image)
            expected = float(torch.softmax(adapter.model(**alone.inputs).logits[0, -1].float(), dim=-1).max())
            assert got == pytest.approx(expected, abs=1e-5)
