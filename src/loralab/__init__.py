"""loralab: LoRA fine-tuning lab for small instruction models."""

__version__ = "0.1.0"
