"""Tiny randomly initialised checkpoints of each supported family, built locally.

For tests and smoke runs: real transformers classes, a real processor (fast
tokenizer trained here with `tokenizers` + image processor), saved with
``save_pretrained`` as safetensors and reloaded through ``load_model``. No
downloads. Seeded, so the same call writes the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.utils import is_torchvision_available

from harness.models.multimodal import ImageTextParts

IMAGE_SIZE = 32
PATCH = 8

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
LLAMA3_BOS = "<|begin_of_text|>"  # Llama-3's BOS, which Idefics3's and Llama-3-Instruct's templates write themselves
SPIECE = "\u2581"  # SentencePiece's word-boundary mark
# A few sentences in the benchmark's register; a small BPE vocabulary over them
# splits rarer words into several sub-word tokens, which the tests rely on.
CORPUS = [
    "USER: What is the capital of the country whose flag is in this image? Answer in a few words. ASSISTANT: Paris",
    "What is the currency of the country in this image that lies in Europe?",
    "Which language is spoken in the country whose flag is shown here?",
    "What is the colour of the creature in this image?",
    "Name the city in Asia where the landmark in the picture stands.",
    "Which archipelago lies north of the continent?",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "user assistant system image question answer words few country countries",
]
VOCAB_SIZE = 420
# The SentencePiece-style alphabet is smaller than byte-level BPE's 256 bytes, so the same vocabulary would
# hold whole rare words; a smaller one splits them ("archipelago" -> "▁archipe" + "lago"), as Llama-2's does.
SP_VOCAB_SIZE = 220

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def bpe_tokenizer(extra_special: list[str], add_bos: bool = True, bos: str = BOS) -> PreTrainedTokenizerFast:
    """A byte-level BPE fast tokenizer trained on ``CORPUS``, with the family's special tokens.

    ``add_bos``: the tokenizer itself prepends ``bos`` (Llama-3's ``<|begin_of_text|>`` for the families
    whose chat template also writes it, which is what makes a double BOS possible).
    """
    specials = list(dict.fromkeys([bos, EOS, PAD, UNK] + extra_special))
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    if add_bos:
        core.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, core.token_to_id(bos))]),
        ])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=4096,
    )


def sentencepiece_tokenizer(extra_special: list[str]) -> PreTrainedTokenizerFast:
    """Llama-2's tokenizer in miniature (the one llava-1.5 ships): BPE over ``▁``-marked words.

    As in Llama-2's tokenizer.json, the normalizer prepends a ``▁`` dummy prefix to every text segment and
    turns spaces into ``▁``, and ``<s>`` is added by the tokenizer; so ``" Paris"`` on its own becomes
    ``▁`` + ``▁Paris`` (the quirk the replace corruption must survive) while ``"a Paris"`` gives
    ``▁a`` + ``▁Paris``. Splitting before each ``▁`` keeps merges inside words, as SentencePiece's are.
    """
    specials = [BOS, EOS, PAD, UNK] + extra_special
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE), normalizers.Replace(" ", SPIECE)])
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme="never", split=True)
    core.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = sorted(set("".join(CORPUS).replace(" ", SPIECE)) | {SPIECE})
    trainer = trainers.BpeTrainer(vocab_size=SP_VOCAB_SIZE, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    core.train_from_iterator(CORPUS, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=4096
    )


def word_level_tokenizer(extra_special: list[str]) -> PreTrainedTokenizerFast:
    """One token per lower-cased word or punctuation mark (the planted model's kind of tokenizer)."""
    specials = [BOS, EOS, PAD, UNK] + extra_special
    core = Tokenizer(models.WordLevel(unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.train_from_iterator(CORPUS, trainer=trainers.WordLevelTrainer(special_tokens=specials, show_progress=False))
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=4096
    )


def _text_config_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )


def _vision_kwargs() -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=PATCH)


def _clip_image_processor(cls_name: str = "CLIPImageProcessorPil", **extra):
    cls = getattr(transformers, cls_name)
    return cls(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
               image_mean=[0.5] * 3, image_std=[0.5] * 3, **extra)


def build_llava(out: Path, chat_template: bool = True, word_level: bool = False) -> None:
    """LLaVA-1.5 in miniature (Llama-2 SentencePiece-style tokenizer, ``USER: <image>\\n... ASSISTANT:``);
    ``word_level`` + no chat template mirrors the planted zoo model."""

    tokenizer = word_level_tokenizer(["<image>"]) if word_level else sentencepiece_tokenizer(["<image>"])
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(), tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE if chat_template else None,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs()).to_dict(),
        text_config=LlamaConfig(**_text_config_kwargs(len(tokenizer))).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    _save(LlavaForConditionalGeneration(config), processor, out)


def build_llava_next(out: Path) -> None:
    """LLaVA-NeXT: the image is tiled by ``image_grid_pinpoints`` (anyres), and after the projector the model
    unpads the tiles and appends a newline row to each: the token count depends on the image size."""

    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    tokenizer = sentencepiece_tokenizer(["<image>"])  # llava-v1.6 ships Llama-2/Mistral SentencePiece tokenizers
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs()).to_dict(),
        text_config=LlamaConfig(**_text_config_kwargs(len(tokenizer))).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    _save(LlavaNextForConditionalGeneration(config), processor, out)


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def build_qwen2_vl(out: Path) -> None:
    """Qwen2-VL: native-resolution patches merged 2x2, multimodal RoPE; the token count follows the image size."""

    tokenizer = bpe_tokenizer(QWEN_SPECIALS, add_bos=False)
    patch, merge = 4, 2
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, patch_size=patch, merge_size=merge,
        temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    processor = _qwen2_vl_processor(image_processor, tokenizer)
    text = _text_config_kwargs(len(tokenizer))
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, head_dim // 2 - 5]}
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2,
                           patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    _save(Qwen2VLForConditionalGeneration(config), processor, out)


IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
IDEFICS3_SPECIALS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def build_idefics3(out: Path) -> None:
    """Idefics3: SigLIP-style tower, pixel-shuffle connector (4x fewer tokens), image framed by marker tokens.

    As in Idefics3-8B-Llama3: the image is split into tiles (one ``<row_i_col_j>`` block each, plus the
    global view), and the chat template writes ``<|begin_of_text|>`` although the tokenizer adds it too.
    """

    tokenizer = bpe_tokenizer(IDEFICS3_SPECIALS, bos=LLAMA3_BOS)
    scale = 2
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    image_seq_len = (IMAGE_SIZE // PATCH) ** 2 // scale**2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=dict(_vision_kwargs()),
        text_config=LlamaConfig(**_text_config_kwargs(len(tokenizer))).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale,
    )
    _save(Idefics3ForConditionalGeneration(config), processor, out)


def _qwen2_vl_processor(image_processor, tokenizer):
    """The real processor where torchvision exists; else image processor + tokenizer saved side by side."""

    if is_torchvision_available():
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return _SavedTogether(ImageTextParts(image_processor, tokenizer))


class _SavedTogether:
    def __init__(self, parts):
        self.parts = parts

    def save_pretrained(self, out: Path) -> None:
        self.parts.image_processor.save_pretrained(out)
        self.parts.tokenizer.save_pretrained(out)


TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-3-Instruct's layout: the template writes the BOS itself, and the tokenizer would add another.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TEXT_TEMPLATES = {
    "llama3": (LLAMA3_CHAT_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], LLAMA3_BOS),
    True: (TEXT_CHAT_TEMPLATE, ["<|im_start|>", "<|im_end|>"], BOS),  # ChatML over plain strings (SmolLM2's kind)
    False: (None, [], BOS),
}


def build_text(out: Path, chat_template: str | bool = "llama3") -> None:
    """A Llama causal LM; ``chat_template``: "llama3" (default: a template that writes the BOS the tokenizer
    also adds), True (ChatML, SmolLM2's kind) or False (none: the fallback prompt)."""

    template, specials, bos = TEXT_TEMPLATES[chat_template]
    tokenizer = bpe_tokenizer(specials, bos=bos)
    tokenizer.chat_template = template
    _save(LlamaForCausalLM(LlamaConfig(**_text_config_kwargs(len(tokenizer)))), tokenizer, out)


# family -> builder of its tiny checkpoint; the test suite runs every family here (tests/test_families.py).
BUILDERS = {"llava": build_llava, "llava_next": build_llava_next, "qwen2_vl": build_qwen2_vl, "idefics3": build_idefics3, "text": build_text}
FAMILIES = tuple(BUILDERS)


def build_tiny(family: str, out_dir: str | Path, seed: int = 0, **options) -> Path:
    """Write a tiny ``family`` checkpoint (model + processor) into ``out_dir`` and return it."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(sorted(BUILDERS))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    BUILDERS[family](out, **options)
    return out


def _save(model, processor, out: Path) -> None:
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def build_llava15_shaped(out: Path, vision: dict, text: dict, vocab_size: int | None = None,
                         image_size: int = 336, patch: int = 14) -> Path:
    """A random LLaVA-1.5-shaped checkpoint (576 image tokens at 336 px / 14 px patches) for the benchmarks:
    real prompt lengths with small or chosen layer shapes. ``vocab_size`` defaults to the tokenizer's."""

    torch.manual_seed(0)
    tokenizer = bpe_tokenizer(["<image>"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>", chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch, **vision).to_dict(),
        text_config=LlamaConfig(vocab_size=vocab_size or len(tokenizer), max_position_embeddings=2048,
                                bos_token_id=0, eos_token_id=1, pad_token_id=2, **text).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    LlavaForConditionalGeneration(config).eval().save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return Path(out)
