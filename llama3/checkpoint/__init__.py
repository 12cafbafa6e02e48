"""Checkpoint formats: Meta, Hugging Face, GGUF and our training checkpoints."""
