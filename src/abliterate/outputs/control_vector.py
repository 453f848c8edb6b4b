"""Export directions as a llama.cpp control vector (GGUF), for ``llama-cli``/``llama-server --control-vector``.

The format, as llama.cpp reads it (``common_control_vector_load_one`` in ``common/common.cpp``, applied by
``llama_adapter_cvec`` in ``src/llama-adapter.cpp``): a GGUF with ``general.architecture = "controlvector"``,
the keys ``controlvector.model_hint`` (the model's GGUF architecture, e.g. ``"llama"``, ``"qwen2"``) and
``controlvector.layer_count`` (written as llama.cpp's ``cvector-generator`` writes it: the number of direction
tensors), and one 1-D F32 tensor ``direction.<n>`` of ``n_embd`` values per steered layer. The loader reads
only the tensors (the metadata is informational), rejects ``direction.0``, and sums every file given (each
times its ``--control-vector-scaled`` strength).

Layer numbering. llama.cpp adds ``direction.n`` to the output of decoder block ``n`` (0-based), after the
block's last residual add (``cur = build_cvec(cur, il)`` just before ``l_out``), at every position, prompt
included; block 0's output cannot be steered, so ``n`` runs over ``1 .. n_layer - 1``. In abliterate's
residual points (point ``p`` is the input of decoder layer ``p``; point ``L`` the output of the last layer),
the output of block ``n`` is point ``n + 1``. So **abliterate point p is written as direction.(p - 1)**, for
``p`` in ``2 .. L``: adding ``c * r`` at point ``p`` with ``abliterate.add(lm, r, c, layers=[p])`` is
``--control-vector-scaled file.gguf c`` with ``r`` written for point ``p``. Points 0 (the embeddings) and 1
(the output of layer 0) have no llama.cpp equivalent and are refused. ``--control-vector-layer-range A B``
counts in llama.cpp's numbering (``direction.A`` .. ``direction.B``).

Weights to GGUF. An abliterated model saved as safetensors (``LoadedModel.save``, ``abliterate apply`` or
:func:`abliterate.checkpoint.stream_edit.stream_orthogonalize`) is a plain transformers checkpoint, so llama.cpp's own
converter turns it into a GGUF, and ``llama-quantize`` shrinks that::

    python llama.cpp/convert_hf_to_gguf.py ./model-abliterated --outfile model-abliterated-f16.gguf --outtype f16
    llama.cpp/build/bin/llama-quantize model-abliterated-f16.gguf model-abliterated-Q4_K_M.gguf Q4_K_M

A control vector instead leaves the weights alone and steers at run time::

    llama-cli -m model-f16.gguf --control-vector-scaled refusal.gguf -4.0 -p "..."
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from abliterate.errors import DirectionError, LayerError
from abliterate.measure.capture import Position
from abliterate.measure.directions import Direction, DirectionSet

ARCHITECTURE = "controlvector"
# transformers ``model_type`` -> the ``general.architecture`` that llama.cpp's convert_hf_to_gguf.py writes
LLAMA_CPP_ARCH: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gpt_neox": "gptneox",
    "olmo2": "olmo2",
}
Vectors = DirectionSet | Direction | torch.Tensor | Mapping[int, Direction | torch.Tensor]


def model_hint_for(model_type: str) -> str:
    """llama.cpp's architecture name for a transformers ``model_type`` (``"qwen2_moe"`` -> ``"qwen2moe"``)."""
    return LLAMA_CPP_ARCH.get(model_type, model_type.replace("_", ""))


def _vector(v: Direction | torch.Tensor, point: int) -> torch.Tensor:
    vec = v.vector if isinstance(v, Direction) else v
    if not isinstance(vec, torch.Tensor):
        raise DirectionError(f"the direction for point {point} must be a Direction or a torch.Tensor")
    vec = vec.detach().to("cpu", torch.float64)
    if vec.dim() == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.dim() != 1:
        raise DirectionError(f"point {point}: a control vector adds one vector per layer, not {tuple(vec.shape)}")
    if not torch.isfinite(vec).all() or vec.norm() < 1e-8:
        raise DirectionError(f"the direction for point {point} is zero or not finite; recompute it")
    return vec / vec.norm()


def _points(layers: Sequence[int] | None, points: int) -> list[int]:
    """The chosen residual points (default: all that llama.cpp can steer), checked and made non-negative."""
    chosen = list(range(2, points)) if layers is None else list(layers)
    for p in chosen:
        if isinstance(p, bool) or not isinstance(p, int) or not -points <= p < points:
            raise LayerError(f"point {p!r} is out of range: these directions have residual points 0..{points - 1}")
    return [p % points for p in chosen]


def _per_point(
    directions: Vectors, layers: Sequence[int] | None, position: Position | None
) -> tuple[dict[int, torch.Tensor], int | None]:
    """{residual point: unit vector} for the chosen points, and the model's layer count when known."""
    if isinstance(directions, DirectionSet):
        pick = (lambda p: directions[p]) if position is None else (lambda p: directions[p, position])
        return {p: _vector(pick(p), p) for p in _points(layers, directions.num_points)}, directions.num_points - 1
    if isinstance(directions, torch.Tensor) and directions.dim() == 2 and directions.shape[0] > 1:
        return {p: _vector(directions[p], p) for p in _points(layers, len(directions))}, len(directions) - 1
    if isinstance(directions, Mapping):
        if missing := [p for p in layers or () if p not in directions]:
            raise LayerError(f"no direction for point(s) {missing}; the mapping has {sorted(directions)}")
        return {int(p): _vector(directions[p], int(p)) for p in (directions if layers is None else layers)}, None
    own = directions.layer if isinstance(directions, Direction) else None
    if layers is None and own is None:
        raise DirectionError("a single direction has no layer: pass layers=[residual points to steer]")
    return {p: _vector(directions, p) for p in ([own] if layers is None else layers)}, None


def export_control_vector(
    directions: Vectors,
    path: str | os.PathLike[str],
    *,
    model_hint: str,
    scale: float | Mapping[int, float] = 1.0,
    layers: Sequence[int] | None = None,
    position: Position | None = None,
    num_layers: int | None = None,
) -> Path:
    """Write ``scale * unit(direction)`` for each chosen residual point as a llama.cpp control vector.

    ``directions`` is a :class:`DirectionSet` (its vector at each point; ``position`` picks one when several
    were captured), a ``[points, hidden]`` tensor, ``{point: vector}``, or one :class:`Direction`/vector
    (written at ``layers``, or at the direction's own point). ``layers`` are abliterate residual points
    (default: every point of the set that llama.cpp can steer, ``2 .. L``); point ``p`` becomes
    ``direction.(p - 1)`` (see the module docstring). ``scale`` is one number or ``{point: scale}``; each
    vector is normalized first, so the file holds exactly ``scale * r``. ``num_layers`` (known from a
    direction set) rejects points past the last layer. The file is written atomically; returns its path.
    """
    import gguf

    vectors, top = _per_point(directions, layers, position)
    top = num_layers if num_layers is not None else top
    if not vectors:
        raise LayerError("no layers to export; pass layers=[...] with at least one residual point")
    if len({v.shape[0] for v in vectors.values()}) > 1:
        raise DirectionError("the directions have different hidden sizes; export directions of one model")
    for p in vectors:
        if p < 2:
            raise LayerError(
                f"point {p} cannot be a llama.cpp control vector: llama.cpp steers the outputs of layers "
                "1..L-1, which are residual points 2..L; pick points >= 2"
            )
        if top is not None and p > top:
            raise LayerError(f"point {p} is out of range: this model has residual points 0..{top}")
    if isinstance(scale, Mapping) and (missing := sorted(set(vectors) - set(scale))):
        raise LayerError(f"no scale for point(s) {missing}; give one per exported point")
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch=ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
        writer.add_int32(f"{ARCHITECTURE}.layer_count", len(vectors))
        for p in sorted(vectors):
            s = float(scale[p] if isinstance(scale, Mapping) else scale)
            writer.add_tensor(f"direction.{p - 1}", (s * vectors[p]).float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
