"""Base models: loading SD1.5/SDXL folders, the offline tiny models and their tokenizer, model hashes."""
