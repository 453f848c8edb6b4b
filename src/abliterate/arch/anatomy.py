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

from abliterate.arch.bias_writers import embedding_norm_writers, layer_bias_writers
from abliterate.arch.patterns import (
    _DOWN,
    LAYER_PATHS,
    OTHER_TOWERS,
    PER_LAYER_POST_NORMS,
    POSITION_EMBEDDING_PATTERNS,
    POST_NORMS,
    WRITER_PATTERNS,
    PostNormSpec,
    writer_kind,
)
from abliterate.arch.writer import Writer
from abliterate.errors import ArchitectureError, LayerError

__all__ = [
    "LAYER_PATHS",
    "POSITION_EMBEDDING_PATTERNS",
    "POST_NORMS",
    "WRITER_PATTERNS",
    "Anatomy",
    "PostNormSpec",
    "Writer",
    "find_anatomy",
    "find_layers",
    "make_writer",
    "writer_kind",
]


@dataclass
class Anatomy:
    layers_path: str
    layers: nn.ModuleList
    embeddings: list[Writer]
    writers: list[list[Writer]] = field(default_factory=list)
    hidden_size: int = 0
    # writers no name pattern found, found by probing (abliterate.arch.discovery), and whether a probe checked them
    discovered: list[str] = field(default_factory=list)
    verified: bool = False
    # loaded for runtime ablation of the residual stream itself (hooks on layer inputs and outputs); then no weight
    # edit is made through it, and ``weight_error`` says why a weight edit would not be exact (None: it would be)
    residual_only: bool = False
    weight_error: str | None = None

    def require_weights(self) -> None:
        """Raise :class:`ArchitectureError` when this anatomy is for runtime residual-stream ablation only."""
        if self.residual_only:
            why = f" ({self.weight_error})" if self.weight_error else ""
            raise ArchitectureError(
                f"this model was loaded with residual_only=True{why}: only runtime ablation of the residual stream "
                "(ablate, induce, add; CLI measure and chat with --residual-stream) is available, no weight edit; "
                "load it without residual_only to edit its weights"
            )

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
    """The width of the residual stream: the input embeddings' (a model whose embeddings are projected to
    another width has no embedding that writes the residual, and is refused)."""
    emb = model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    name = type(model).__name__
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ArchitectureError(
            f"{name}'s input embeddings are a {type(emb).__name__}, not one embedding table; "
            "abliterate edits models whose token embeddings write the residual stream"
        )
    width = int(weight.shape[-1])
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    stream = getattr(text, "hidden_size", None)
    if isinstance(stream, int) and stream != width:
        raise ArchitectureError(
            f"{name}'s token embeddings are {width}-wide but its residual stream is {stream}-wide (projected in "
            "between); abliterate edits models whose token embeddings write the residual stream directly"
        )
    return width


def _conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _linear_axis(module: nn.Module, hidden: int | None = None) -> tuple[str, int] | None:
    """(param, out_axis) for a 2-D writer: Linear stores [out, in], GPT-2's Conv1D [in, out], an embedding
    [rows, hidden]; another module with one 2-D ``weight`` writes along its hidden-size axis."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return ("weight", 0)
    if _conv1d(module) or isinstance(module, nn.Embedding):
        return ("weight", 1)
    if hidden is not None and weight.shape[1] == hidden and weight.shape[0] != hidden:
        return ("weight", 1)
    return ("weight", 0)


def _out_size(module: nn.Module, axis: int) -> int:
    # a quantized Linear (bitsandbytes) stores packed bytes; out_features is its real output size
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[axis]


def _fused_axis(module: nn.Module, pname: str, hidden: int) -> int | None:
    """The output axis of a fused-experts parameter, if it has a hidden-size one: 3-D ``[experts, ., .]``
    (``is_transposed`` says which axis when both could be), or 2-D ``[experts * inner, hidden]`` (DBRX)."""
    p = getattr(module, pname)
    if p.dim() == 2:
        return 1 if p.shape[1] == hidden else None
    transposed = getattr(module, "is_transposed", None)
    if transposed is None and p.shape[1] != hidden:  # no flag: the hidden-size axis says which
        transposed = True
    axis = 2 if transposed else 1
    return axis if p.shape[axis] == hidden else None


def make_writer(
    layer: nn.Module,
    module: nn.Module,
    rel: str,
    index: int,
    prefix: str,
    hidden: int,
    post_norm: nn.Module | None = None,
    param: str | None = None,
) -> Writer | None:
    """A :class:`Writer` for ``module`` (at ``rel`` inside ``layer``) whose output has the hidden size: a 2-D
    module, or a fused-experts container (its 3-D parameter ``param``, else the one named like a down projection,
    else its only 3-D parameter with a hidden-size output axis). ``None`` when it has no such weight."""
    post = post_norm if post_norm is not None else _post_norm_for(layer, rel)
    if param is None and (spec := _linear_axis(module, hidden)):
        pname, axis = spec
        if _out_size(module, axis) != hidden:
            return None
        has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
        bias = "bias" if has_bias else None
        return Writer(f"{prefix}.{rel}", module, pname, axis, bias, index, post, kind=writer_kind(rel))
    fused = [
        n for n, p in module.named_parameters(recurse=False) if p.dim() in (2, 3) and _fused_axis(module, n, hidden)
    ]
    if param is None:
        named = [n for n in fused if re.fullmatch(_DOWN, n)]
        three = [n for n in fused if getattr(module, n).dim() == 3]
        param = named[0] if len(named) == 1 else three[0] if len(three) == 1 else None
    if param is None or param not in fused:
        return None
    axis = _fused_axis(module, param, hidden)
    assert axis is not None
    bias = f"{param}_bias" if isinstance(getattr(module, f"{param}_bias", None), torch.Tensor) else None
    return Writer(f"{prefix}.{rel}.{param}", module, param, axis, bias, index, post, kind=writer_kind(f"{rel}.{param}"))


def _post_norm_for(layer: nn.Module, rel: str) -> nn.Module | None:
    for pattern, norm_path in PER_LAYER_POST_NORMS:
        if re.fullmatch(pattern, rel) and (norm := _get(layer, norm_path)) is not None:
            return norm
    for spec in POST_NORMS:
        if all(_get(layer, path) is not None for path in spec.requires):
            for pattern, norm_path in spec.norms:
                if re.fullmatch(pattern, rel):
                    return _get(layer, norm_path)
            return None
    return None


def _layer_writers(layer: nn.Module, index: int, prefix: str, patterns: Sequence[str], hidden: int) -> list[Writer]:
    compiled = [re.compile(p) for p in patterns]
    found: list[Writer] = []
    for rel, module in layer.named_modules():
        if not rel:
            continue
        # 2-D writers: the module itself matches.
        if any(c.fullmatch(rel) for c in compiled) and _linear_axis(module, hidden):
            if (w := make_writer(layer, module, rel, index, prefix, hidden)) is not None:
                found.append(w)
            continue
        # Fused experts: a 3-D parameter of this module matches.
        for pname, p in module.named_parameters(recurse=False):
            if (
                p.dim() in (2, 3)
                and any(c.fullmatch(f"{rel}.{pname}") for c in compiled)
                and (w := make_writer(layer, module, rel, index, prefix, hidden, param=pname)) is not None
            ):
                found.append(w)
    return found


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def _search_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The layer list of an architecture no path names: a ModuleList of blocks of one class (as many as the
    config's ``num_hidden_layers`` when it says), the one holding the most parameters, outside any vision or audio
    tower."""
    n = _num_layers(model)
    found: list[tuple[bool, int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or re.search(OTHER_TOWERS, name):
            continue
        if len({type(m) for m in module}) != 1 or not any(True for _ in module[0].parameters()):
            continue
        size = sum(p.numel() for p in module.parameters())
        found.append((len(module) == n, size, name, module))
    if not found:
        return None
    _, _, name, module = max(found, key=lambda f: (f[0], f[1]))
    return name, module


def find_layers(model: nn.Module, layers_path: str | None = None, *, search: bool = False) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the decoder layers: ``layers_path``, else a known path, else (with ``search``,
    for a probe to verify) the ModuleList that looks like the layer stack."""
    for path in (layers_path,) if layers_path else LAYER_PATHS:
        candidate = _get(model, path)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return path, candidate
    if search and layers_path is None and (searched := _search_layers(model)) is not None:
        return searched
    looked = layers_path or ", ".join(LAYER_PATHS)
    towers = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and re.search(OTHER_TOWERS, n)]
    seen = f"; the layer stacks found belong to a vision or audio tower ({', '.join(towers[:3])})" if towers else ""
    raise ArchitectureError(
        f"cannot find the text decoder layers of {type(model).__name__}: looked for {looked}{seen}; "
        "pass layers_path='<dotted.path.to.ModuleList>'"
    )


def _check_override(layers: nn.ModuleList, patterns: Sequence[str], hidden: int) -> None:
    """A ``writer_patterns`` override must match something, and only modules that write the hidden size."""
    for pattern in patterns:
        matched = [
            (rel, m)
            for rel, m in layers[0].named_modules()
            if rel
            and (
                re.fullmatch(pattern, rel)
                or any(re.fullmatch(pattern, f"{rel}.{n}") for n, _ in m.named_parameters(recurse=False))
            )
        ]
        if not matched:
            raise ArchitectureError(
                f"writer pattern '{pattern}' matches no module of layer 0 ({type(layers[0]).__name__}); "
                "patterns are regular expressions on names inside one layer, e.g. 'mlp\\.down_proj'"
            )
        for rel, m in matched:
            if make_writer(layers[0], m, rel, 0, "", hidden) is None and not any(
                make_writer(layers[0], m, rel, 0, "", hidden, param=n)
                for n, p in m.named_parameters(recurse=False)
                if p.dim() == 3
            ):
                raise ArchitectureError(
                    f"writer pattern '{pattern}' matches {rel} ({type(m).__name__}), whose output is not the hidden "
                    f"size {hidden}; name the modules that write into the residual stream"
                )


def find_anatomy(
    model: nn.Module,
    *,
    layers_path: str | None = None,
    writer_patterns: Sequence[str] | None = None,
    require_writers: bool = True,
    search_layers: bool = False,
) -> Anatomy:
    """Locate the embeddings, decoder layers and residual writers of ``model`` by name patterns.

    ``layers_path`` (e.g. ``"model.layers"``) and ``writer_patterns`` (regular expressions on
    module names relative to a layer, e.g. ``r"attn\\.out"``) override the built-in patterns for
    architectures they do not cover. :func:`abliterate.arch.selfcheck.checked_anatomy` (what loading uses) passes
    ``require_writers=False`` (a layer without writers is left empty for discovery to fill) and
    ``search_layers=True`` (an unknown layer list is searched for), and verifies the result on a probe.
    """
    found_path, layers = find_layers(model, layers_path, search=search_layers)
    hidden = _hidden_size(model)
    if writer_patterns:
        _check_override(layers, writer_patterns, hidden)
    patterns = tuple(writer_patterns) if writer_patterns else WRITER_PATTERNS
    writers = [_layer_writers(layer, i, f"{found_path}.{i}", patterns, hidden) for i, layer in enumerate(layers)]
    if not writer_patterns:
        for i, layer in enumerate(layers):
            writers[i] += layer_bias_writers(layer, i, f"{found_path}.{i}", hidden)
    for i, ws in enumerate(writers):
        if not ws and require_writers:
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
            and not re.search(OTHER_TOWERS, name)
            and any(re.fullmatch(p, name) for p in POSITION_EMBEDDING_PATTERNS)
            and module.weight.shape[-1] == hidden
        ):
            embeddings.append(_embedding_writer(module, name))
    embeddings += embedding_norm_writers(model, embeddings, hidden)
    return Anatomy(found_path, layers, embeddings, writers, hidden)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    return "input_embeddings"


def _embedding_writer(module: nn.Module, name: str) -> Writer:
    """The token table; when the embedding module normalizes its lookup with a norm of its own (Inkling), that norm
    is the table's post-norm and runtime edits act on its input, where the rows are."""
    children = list(module.children())
    if isinstance(module, nn.Embedding) and len(children) == 1 and "norm" in type(children[0]).__name__.lower():
        return Writer(name, module, "weight", 1, None, None, children[0], "embedding", children[0], hook_input=True)
    return Writer(name, module, "weight", 1, None, None, kind="embedding")
