"""What a model load can be asked for beyond the model itself, in a module light enough for the commands'
parsers (loading.py itself brings in transformers' processing stack)."""

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


# Qwen2-VL's own default: at most 1280 visual tokens (28x28 pixels each after the 2x2 merge). Hub checkpoints
# ship 12845056 (16384 tokens), which on a large photo means tens of thousands of image tokens per question.
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
