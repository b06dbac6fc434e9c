"""A quick causal-trace check that a planted model stores its facts in layer K.

Corrupt the image (Gaussian noise on the projected image features, 3x their
std), then restore the clean output of one layer's MLP at the last prompt
token and see how much of p(answer) comes back. In a well-planted model the
restoration at layer K brings back most of it and other layers little. This
is a sanity check for the zoo build, not the project's tracer
(harness/tracing), which the later issues check against this model.
"""

from __future__ import annotations

import torch

from harness.hooks import edit_outputs, record_outputs
from harness.models.prompting import fallback_prompt

NOISE_SCALE = 3.0


@torch.no_grad()
def mlp_restoration_effects(model, processor, questions: list[tuple[str, object, str]], seed: int = 0) -> dict:
    """Per-layer restoration effects for (question, image, answer) triples.

    Returns the mean normalised effect per layer, and for the "affected"
    questions (answered correctly when clean, p(answer) at least halved by the
    noise) how often each layer has the largest effect.
    """
    model.eval()
    tokenizer = processor.tokenizer
    prompts = [fallback_prompt(q)[0] for q, _, _ in questions]
    inputs = processor(text=prompts, images=[image for _, image, _ in questions], return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    answer_ids = torch.tensor([tokenizer.convert_tokens_to_ids(a) for _, _, a in questions], device=model.device)
    layers = model.model.language_model.layers
    mlps = {str(i): layer.mlp for i, layer in enumerate(layers)}
    projector = model.model.multi_modal_projector
    rows = torch.arange(len(questions), device=model.device)

    def p_answer(logits):
        return logits[:, -1].float().softmax(-1)[rows, answer_ids]

    with record_outputs(mlps) as clean_mlp, record_outputs({"projector": projector}) as clean_image:
        clean_logits = model(**inputs).logits
    p_clean = p_answer(clean_logits)
    correct = clean_logits[:, -1].argmax(-1) == answer_ids
    features = clean_image["projector"]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(features.shape, generator=generator).to(features) * NOISE_SCALE * features.std()
    corrupt = {projector: lambda t: t + noise}

    with edit_outputs(corrupt):
        p_corrupt = p_answer(model(**inputs).logits)
    restored = []
    for i, layer in enumerate(layers):
        def restore_last(t, i=i):
            t = t.clone()
            t[:, -1] = clean_mlp[str(i)][:, -1]
            return t
        with edit_outputs({**corrupt, layer.mlp: restore_last}):
            restored.append(p_answer(model(**inputs).logits))
    restored = torch.stack(restored, dim=1)  # questions x layers
    gap = (p_clean - p_corrupt).clamp_min(1e-6)
    effect = (restored - p_corrupt[:, None]) / gap[:, None]
    affected = correct & (p_corrupt <= 0.5 * p_clean)
    peaks = effect[affected].argmax(-1)
    return {
        "n_questions": len(questions),
        "n_correct": int(correct.sum()),
        "n_affected": int(affected.sum()),
        "p_clean_mean": round(float(p_clean[affected].mean()), 4) if affected.any() else None,
        "p_corrupt_mean": round(float(p_corrupt[affected].mean()), 4) if affected.any() else None,
        "mean_effect_per_layer": [round(float(x), 4) for x in effect[affected].mean(0)] if affected.any() else [],
        "peak_share_per_layer": [round(float((peaks == i).float().mean()), 4) for i in range(len(layers))]
        if affected.any() else [],
    }
