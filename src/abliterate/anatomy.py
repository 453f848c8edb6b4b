"""Model anatomy as data: where the embedding, the decoder layers and the residual writers are.

A *residual writer* is any parameterized module whose output is added to the residual stream:
attention output projections, MLP down projections, every MoE expert's down projection (both
``ModuleList`` experts and the fused 3-D parameter form), shared experts, and the embeddings.
Architectures are described by name patterns (regular expressions matched against module names
relative to a decoder layer), never by branches on ``model_type``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ArchitectureError, LayerError

# Where the list of decoder layers may live, tried in order (VLM wrappers one level deeper).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "model.language_model.model.layers",
    "language_model.model.layers",
    "model.text_model.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
)

_ATTN = r"(self_attn|attn|attention|self_attention|mixer)"
_MLP = r"(mlp|feed_forward|block_sparse_moe|ffn|moe)"
_DOWN = r"(down_proj|c_proj|dense_4h_to_h|fc2|w2|wo)"

# Relative names (within one decoder layer) of modules or 3-D parameters that write to the residual.
WRITER_PATTERNS: tuple[str, ...] = (
    rf"{_ATTN}\.(o_proj|out_proj|c_proj|dense|wo)",
    rf"{_MLP}\.{_DOWN}",
    rf"{_MLP}\.shared_experts?\.{_DOWN}",
    rf"{_MLP}\.experts\.\d+\.{_DOWN}",
    rf"{_MLP}\.experts\.{_DOWN}",  # fused experts: a 3-D parameter of the experts module
)

# Learned absolute position embeddings also write into the residual stream.
POSITION_EMBEDDING_PATTERNS: tuple[str, ...] = (r"(.*\.)?wpe", r"(.*\.)?embed_positions")


@dataclass(frozen=True)
class PostNormSpec:
    """Architectures that normalize a writer's output before adding it (Gemma 2/3, OLMo 2).

    ``layer_class`` is matched against the decoder layer's class name; ``norms`` maps a writer
    pattern to the attribute path of the norm applied to that writer's output.
    """

    layer_class: str
    norms: tuple[tuple[str, str], ...]


POST_NORMS: tuple[PostNormSpec, ...] = (
    PostNormSpec(
        r"(Gemma2|Gemma3|Gemma3Text|T5Gemma)DecoderLayer",
        ((rf"{_ATTN}\..*", "post_attention_layernorm"), (rf"{_MLP}\..*", "post_feedforward_layernorm")),
    ),
    PostNormSpec(
        r"Olmo(2|3)DecoderLayer",
        ((rf"{_ATTN}\..*", "post_attention_layernorm"), (rf"{_MLP}\..*", "post_feedforward_layernorm")),
    ),
)


@dataclass
class Writer:
    """One parameter that writes into the residual stream.

    ``out_axis`` is the weight axis of size ``hidden_size`` (the residual side). ``module`` is the
    module whose forward output is that write (the experts module for fused experts).
    ``post_norm`` is an RMSNorm applied to the write before it is added, if any. ``kind`` is ``"attn"``
    (attention or another token mixer), ``"mlp"`` (MLP, every MoE expert, shared experts), ``"embedding"``
    or ``"other"`` (a custom writer pattern matching neither), from :func:`writer_kind`.
    """

    name: str
    module: nn.Module
    param: str
    out_axis: int
    bias: str | None
    layer: int | None
    post_norm: nn.Module | None = None
    kind: str = "other"

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def bias_tensor(self) -> torch.Tensor | None:
        return None if self.bias is None else getattr(self.module, self.bias)


@dataclass
class Anatomy:
    layers_path: str
    layers: nn.ModuleList
    embeddings: list[Writer]
    writers: list[list[Writer]] = field(default_factory=list)
    hidden_size: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def all_writers(self, layers: Sequence[int] | None = None) -> list[Writer]:
        chosen = range(self.num_layers) if layers is None else layers
        return [w for i in chosen for w in self.writers[i]]

    def check_layer(self, layer: int, *, allow_output: bool = False) -> int:
        """Validate a layer index (negative counts from the end) and return it non-negative."""
        top = self.num_layers + (1 if allow_output else 0)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise LayerError(f"layer {layer!r} is not an integer; use one of 0..{top - 1}")
        if not -top <= layer < top:
            raise LayerError(f"layer {layer} is out of range: this model has layers 0..{top - 1}; pick one of those")
        return layer % top


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _hidden_size(model: nn.Module) -> int:
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[-1])


def _linear_axis(module: nn.Module) -> tuple[str, int] | None:
    """(param, out_axis) for a 2-D writer: Linear stores [out, in], GPT-2's Conv1D stores [in, out]."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return ("weight", 1 if type(module).__name__ == "Conv1D" else 0)


def _post_norm_for(layer: nn.Module, rel: str) -> nn.Module | None:
    for spec in POST_NORMS:
        if re.fullmatch(spec.layer_class, type(layer).__name__):
            for pattern, norm_path in spec.norms:
                if re.fullmatch(pattern, rel):
                    return _get(layer, norm_path)
    return None


def writer_kind(rel: str) -> str:
    """``"mlp"`` or ``"attn"`` for a writer's module name relative to its decoder layer, else ``"other"``."""
    if re.match(rf"{_MLP}\.", rel):
        return "mlp"
    return "attn" if re.match(rf"{_ATTN}\.", rel) else "other"


def _layer_writers(layer: nn.Module, index: int, prefix: str, patterns: Sequence[str], hidden: int) -> list[Writer]:
    compiled = [re.compile(p) for p in patterns]
    found: list[Writer] = []
    for rel, module in layer.named_modules():
        if not rel:
            continue
        # 2-D writers: the module itself matches.
        if any(c.fullmatch(rel) for c in compiled) and (spec := _linear_axis(module)):
            param, axis = spec
            # a quantized Linear (bitsandbytes) stores packed bytes; out_features is its real output size
            out_size = module.out_features if isinstance(module, nn.Linear) else module.weight.shape[axis]
            if out_size != hidden:
                continue
            has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
            found.append(
                Writer(
                    f"{prefix}.{rel}",
                    module,
                    param,
                    axis,
                    "bias" if has_bias else None,
                    index,
                    _post_norm_for(layer, rel),
                )
            )
            continue
        # Fused experts: a 3-D parameter of this module matches.
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() != 3 or not any(c.fullmatch(f"{rel}.{pname}") for c in compiled):
                continue
            axis = 2 if getattr(module, "is_transposed", False) else 1
            if p.shape[axis] != hidden:
                continue
            bias = f"{pname}_bias" if isinstance(getattr(module, f"{pname}_bias", None), torch.Tensor) else None
            found.append(
                Writer(f"{prefix}.{rel}.{pname}", module, pname, axis, bias, index, _post_norm_for(layer, rel))
            )
    for w in found:
        w.kind = writer_kind(w.name[len(prefix) + 1 :])
    return found


def find_anatomy(
    model: nn.Module,
    *,
    layers_path: str | None = None,
    writer_patterns: Sequence[str] | None = None,
) -> Anatomy:
    """Locate the embeddings, decoder layers and residual writers of ``model``.

    ``layers_path`` (e.g. ``"model.layers"``) and ``writer_patterns`` (regular expressions on
    module names relative to a layer, e.g. ``r"attn\\.out"``) override the built-in patterns for
    architectures they do not cover.
    """
    paths = (layers_path,) if layers_path else LAYER_PATHS
    layers = None
    for path in paths:
        candidate = _get(model, path)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            layers, found_path = candidate, path
            break
    if layers is None:
        raise ArchitectureError(
            f"cannot find the decoder layers of {type(model).__name__}: looked for "
            f"{', '.join(paths)}; pass layers_path='<dotted.path.to.ModuleList>'"
        )
    hidden = _hidden_size(model)
    patterns = tuple(writer_patterns) if writer_patterns else WRITER_PATTERNS
    writers = [_layer_writers(layer, i, f"{found_path}.{i}", patterns, hidden) for i, layer in enumerate(layers)]
    for i, ws in enumerate(writers):
        if not ws:
            names = sorted({n for n, _ in layers[i].named_modules() if n})
            raise ArchitectureError(
                f"found no residual writers in layer {i} of {type(model).__name__} "
                f"(looked for {' | '.join(patterns)} among {', '.join(names[:12])}"
                f"{', ...' if len(names) > 12 else ''}); pass writer_patterns=[...] naming them"
            )
    embeddings = [_embedding_writer(model.get_input_embeddings(), _module_name(model, model.get_input_embeddings()))]
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Embedding)
            and module is not model.get_input_embeddings()
            and any(re.fullmatch(p, name) for p in POSITION_EMBEDDING_PATTERNS)
            and module.weight.shape[-1] == hidden
        ):
            embeddings.append(_embedding_writer(module, name))
    return Anatomy(found_path, layers, embeddings, writers, hidden)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    return "input_embeddings"


def _embedding_writer(module: nn.Module, name: str) -> Writer:
    return Writer(name, module, "weight", 1, None, None, kind="embedding")
