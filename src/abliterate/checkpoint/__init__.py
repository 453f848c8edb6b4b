"""Editing safetensors checkpoints shard by shard, without loading the model."""

from abliterate.checkpoint.stream_edit import StreamReport, stream_orthogonalize

__all__ = [
    "stream_orthogonalize",
    "StreamReport",
]
