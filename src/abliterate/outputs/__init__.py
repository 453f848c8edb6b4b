"""Artifacts: reports and plots, the model card, the manifest, hub upload, PEFT adapters, control vectors."""
