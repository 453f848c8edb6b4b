"""Editing safetensors checkpoints shard by shard, without loading the model."""
