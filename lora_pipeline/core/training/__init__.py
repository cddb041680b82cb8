"""LoRA training on dataset snapshots (kohya-compatible files), by job: `inputs/` (what a step reads: rows,
captions, latents), `step/` (one training step and its parts), `kohya/` (the network and its files in kohya's
format), `run/` (a whole run: `run/trainer.py`'s `train_lora` is the entry point); the recipe and what all of
them share (seeds, timing, progress) at this level."""
