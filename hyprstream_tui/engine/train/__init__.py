"""LoRA training on git: config, samples, the loop, checkpoints, the job, export and merge.

Importing this package stays cheap: torch, transformers and peft load inside the functions.
"""
