"""An edit plan written into a GGUF file: the residual writers' tensors found by gguf's own tensor name map, edited in
float32 and re-encoded (:mod:`abliterate.checkpoint.gguf_file`), every other tensor and key-value copied as it is.

Two callers: ``run``/``apply`` on a model loaded from a ``.gguf`` (the plan of the edit made in memory, whose writers
are that model's modules) and ``apply --stream`` (:func:`stream_gguf_edit`: the module tree is built on the meta
device from the GGUF's own metadata, as transformers reads it, so nothing but one tensor at a time is loaded).

Orientation: GGUF stores a matrix with ``ne0`` the input length, i.e. PyTorch order ``[out, in]`` once reversed, for
every architecture (llama.cpp's converter transposes GPT-2's ``Conv1D`` weights to get there), and an embedding as
``[vocab, hidden]``. So a layer writer's residual axis is the second-last of the reversed GGUF shape (experts
``[n_expert, hidden, ff]`` included), the embeddings' the last, and both are checked against the hidden size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from abliterate.arch.anatomy import find_anatomy
from abliterate.arch.miniature import check_on_miniature
from abliterate.checkpoint.gguf_file import TensorEdit, Written, read_gguf, write_edited
from abliterate.edit.plan import Directions, EditPlan, WriterEdit, edited_names, plan_of
from abliterate.edit.spec import EditSpec
from abliterate.errors import ArchitectureError, ModelLoadError, OutputError
from abliterate.lm.model import LoadedModel
from abliterate.ops.kernel import project_out, project_tensor
from abliterate.version import __version__

OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
EMBEDDING = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"


@dataclass(frozen=True)
class GgufModel:
    """What a GGUF says about its model: the reader, llama.cpp's architecture name, its gguf enum, block count."""

    reader: Any
    arch_name: str
    arch: Any
    blocks: int

    @classmethod
    def open(cls, path: Path) -> GgufModel:
        reader = read_gguf(path)
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ModelLoadError(f"{path} has no general.architecture key; it is not a model GGUF")
        name = str(field.contents())
        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(name)
        if arch is None:
            raise ArchitectureError(
                f"{path.name} is a '{name}' GGUF, an architecture the installed gguf package does not know; "
                "upgrade gguf (pip install -U gguf)"
            )
        blocks = reader.fields.get(f"{name}.block_count")
        return cls(reader, name, arch, int(blocks.contents()) if blocks is not None else 0)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name of a transformers parameter name (gguf's map; ``.weight``/``.bias`` kept)."""
        tmap = gguf.get_tensor_name_map(self.arch, self.blocks)
        found = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:  # a fused experts parameter has no suffix in transformers, ".weight" in the GGUF
            bare = tmap.get_name(hf_name)
            found = f"{bare}.weight" if bare is not None else None
        return found


def _editor(e: WriterEdit, axis: int | None, norm_preserving: bool) -> Callable[[np.ndarray], np.ndarray]:
    """The float32 edit of one stored tensor: ``basis`` projected out along ``axis`` (None: a 1-D constant)."""
    basis = e.basis.to(torch.float32)

    @torch.no_grad()
    def edit(values: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(values)
        if axis is None:
            return project_out(t, basis, e.scale).numpy()
        project_tensor(t, axis, basis, e.scale, norm_preserving)
        return values

    return edit


def gguf_edits(plan: EditPlan, model: GgufModel, hidden: int) -> tuple[dict[str, TensorEdit], dict[str, str]]:
    """The GGUF tensors ``plan`` edits ({name: edit}) and the tensors to append ({name: copy of}): the original
    embedding as the output head, when the embedding is edited and the file ties the head to it."""
    tensors = {t.name: t for t in model.reader.tensors}
    edits: dict[str, TensorEdit] = {}
    for e in plan.edits:
        w = e.writer
        for hf_name, is_bias in zip(edited_names(w), (False, True), strict=False):
            name = model.gguf_name(hf_name)
            if name is None or name not in tensors:
                raise ArchitectureError(
                    f"no GGUF tensor for {hf_name} ({name or 'unknown to gguf'}) in this '{model.arch_name}' file; "
                    "the GGUF and the model disagree: re-export the GGUF or apply to the safetensors model"
                )
            shape = tuple(int(d) for d in reversed(tensors[name].shape))
            constant = is_bias or len(shape) == 1
            axis = None if constant else len(shape) - 1 if w.layer is None else len(shape) - 2
            if shape[-1 if axis is None else axis] != hidden:
                raise ArchitectureError(
                    f"GGUF tensor {name} has shape {list(shape)} (PyTorch order), whose residual axis is not the "
                    f"hidden size {hidden}; the GGUF and the edit disagree"
                )
            row_wise = axis is not None and axis == len(shape) - 1
            edits[name] = TensorEdit(_editor(e, axis, plan.norm_preserving and not constant), row_wise)
    appended = {}
    if EMBEDDING in edits and OUTPUT not in tensors:  # a tied head: keep it unedited, as untie_embeddings does
        if gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[model.arch]:
            raise ArchitectureError(
                f"'{model.arch_name}' ties its output head to the embeddings and llama.cpp loads no separate one, "
                "so an embedding edit cannot be written to its GGUF; choose an edit without the embedding"
            )
        appended[OUTPUT] = EMBEDDING
    return edits, appended


def provenance(edit: Mapping[str, Any] | None) -> dict[str, str]:
    """The ``general.*`` keys a written GGUF carries: that it was abliterated, by which version and edit."""
    keys = {"general.abliterated": f"abliterate {__version__}: refusal direction(s) projected out of the weights"}
    if edit is not None:
        keys["general.abliterate.edit"] = json.dumps(edit, sort_keys=True)
    return keys


def write_plan_gguf(
    src: Path,
    dst: Path,
    plan: EditPlan,
    hidden: int,
    *,
    gguf_type: str = "auto",
    edit: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Written:
    """``plan`` (whose writers are modules of a model loaded from ``src``, or of its meta twin) written into a copy
    of the GGUF ``src`` at ``dst``; ``edit`` (edit.json's content) is recorded in its key-values."""
    model = GgufModel.open(src)
    edits, appended = gguf_edits(plan, model, hidden)
    return write_edited(
        src,
        dst,
        edits,
        gguf_type=gguf_type,
        extra=provenance(edit),
        appended=appended,
        progress=progress,
        reader=model.reader,
    )


def meta_model(path: Path) -> nn.Module:
    """The module tree of the GGUF's model on the meta device, from its metadata as transformers reads it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(
            f"transformers cannot build a model from {path.name}: {str(exc).splitlines()[0]}"
        ) from None
    model.tie_weights()
    return model.eval()


def check_target(src: Path, dst: Path, overwrite: bool) -> Path:
    """The output GGUF path: a ``.gguf`` file that is not the input, absent unless ``overwrite``."""
    target = dst.expanduser().resolve()
    if target == src or (target.exists() and target.samefile(src)):
        raise OutputError(f"output {target} is the input GGUF; choose another file name")
    if target.suffix.lower() != ".gguf":
        raise OutputError(f"output {target} must be a .gguf file; name it like model-abliterated.gguf")
    if target.exists() and not overwrite:
        raise OutputError(f"{target} already exists; choose a new file name or pass --force")
    if target.exists() and not target.is_file():
        raise OutputError(f"{target} exists and is not a file; choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def stream_gguf_edit(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    spec: EditSpec,
    source: Directions,
    *,
    gguf_type: str = "auto",
    edit: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    verify: bool = True,
    model_type: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Written:
    """The edit ``spec`` (with its directions ``source``) written into a copy of the GGUF ``src`` without loading the
    model: tensor by tensor, peak memory about one edited tensor in float32 (the embeddings in row blocks).
    ``model_type``: the transformers model type the edit was found on, refused when the GGUF's differs."""
    path = Path(src).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file; pass a .gguf model")
    target = check_target(path, Path(dst), overwrite)
    GgufModel.open(path)  # a truncated file or an architecture gguf does not know: our one line, before transformers
    model = meta_model(path)
    if model_type is not None and model.config.model_type != model_type:
        raise ArchitectureError(
            f"the edit was found on a '{model_type}' model but {path.name} is '{model.config.model_type}'; "
            "apply it to a GGUF of the same model"
        )
    anatomy = find_anatomy(model)
    if verify:
        check_on_miniature(model, anatomy, None, None)
    if any(w.post_norm is not None for w in [*anatomy.embeddings, *anatomy.all_writers()]):
        raise ArchitectureError(
            f"{type(model).__name__} normalizes its writers' outputs, whose gains a streaming GGUF edit does not "
            "read; apply the edit to the loaded model instead (apply without --stream)"
        )
    plan = plan_of(LoadedModel(model, None, anatomy, str(path), None), spec, source)
    return write_plan_gguf(path, target, plan, anatomy.hidden_size, gguf_type=gguf_type, edit=edit, progress=progress)
