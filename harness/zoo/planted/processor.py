"""The planted model's word-level tokenizer and its LlavaProcessor.

One token per lower-cased word or punctuation mark, built with `tokenizers`
from the planted world's vocabulary plus the words of the fallback prompt,
so the model never has to assemble a name or a city from sub-words and a
constraint's characters map onto whole tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from harness.models.prompting import FALLBACK_TEMPLATE, IMAGE_PLACEHOLDER
from vqa_constraints.sources.planted_world import IMAGE_SIZE

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD, IMAGE_PLACEHOLDER]
# Image normalisation shared by training and the saved image processor.
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def _pre_tokenizer():
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def prompt_words() -> list[str]:
    """The words of the fallback prompt around the question ("user", ":", "answer", ...)."""
    text = FALLBACK_TEMPLATE.replace("{question}", " ").replace(IMAGE_PLACEHOLDER, " ").lower()
    return [word for word, _ in _pre_tokenizer().pre_tokenize_str(text)]


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words`` + prompt words; specials first, fixed order."""
    vocabulary = list(SPECIAL_TOKENS)
    for word in sorted(set(words) | set(prompt_words())):
        if word not in vocabulary:
            vocabulary.append(word)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = _pre_tokenizer()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocabulary.index(BOS))]
    )
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        padding_side="left",
        model_max_length=256,
    )
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast, patch_size: int) -> LlavaProcessor:
    """A LlavaProcessor that expands <image> to exactly one token per image feature.

    CLIP keeps a CLS token (num_additional_image_tokens=1) that the "default"
    feature strategy drops, so (IMAGE_SIZE / patch_size)**2 tokens remain.
    """
    # The PIL backend: the same numbers as the torchvision one, without needing torchvision.
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_PLACEHOLDER,
    )
