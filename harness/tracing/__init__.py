"""MultimodalCausalTrace and attention-contribution analyses."""
