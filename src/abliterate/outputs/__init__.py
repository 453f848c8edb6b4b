"""Artifacts: reports and plots, the model card, the manifest, hub upload, PEFT adapters, control vectors."""

from abliterate.outputs.adapter import export_adapter
from abliterate.outputs.card import model_card
from abliterate.outputs.control_vector import export_control_vector
from abliterate.outputs.hub import push
from abliterate.outputs.manifest import read_manifest, verify_folder, write_manifest
from abliterate.outputs.report import eval_report, write_report

__all__ = [
    "eval_report",
    "export_adapter",
    "export_control_vector",
    "model_card",
    "push",
    "read_manifest",
    "verify_folder",
    "write_manifest",
    "write_report",
]
