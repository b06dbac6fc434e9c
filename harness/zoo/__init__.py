"""The model zoo: small, genuine Hugging Face checkpoints built locally."""
