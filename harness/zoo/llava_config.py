"""The LLaVA configuration both zoo models share: a CLIP-style tower, the two-layer projector, a Llama decoder."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlavaConfig


def image_tokens_per_image(image_size: int, patch_size: int) -> int:
    """One token per patch; the CLS token is dropped (``vision_feature_select_strategy="default"``)."""
    return (image_size // patch_size) ** 2


def clip_llava_config(text_config, *, image_token_index: int, image_size: int, patch_size: int, vision_hidden: int,
                      vision_layers: int, vision_heads: int, vision_intermediate: int) -> LlavaConfig:
    """One image token per patch (CLS dropped), features from the tower's last layer (trained for this model)."""
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        image_seq_length=image_tokens_per_image(image_size, patch_size),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
