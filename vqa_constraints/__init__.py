"""VQA-Constraints: factual visual questions annotated with visual and textual constraints."""

__version__ = "0.1.0"

CONFIGS = ("single_constraint", "multi_constraint", "encyclopedic")
