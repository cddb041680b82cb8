"""Lineage: from a LoRA file back to the source files, captions, recipe, base model and code that made it."""
