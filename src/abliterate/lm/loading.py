"""Load a causal LM (or the text stack of an image-text-to-text model) from a hub id, a local directory or a
single ``.gguf`` file."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from abliterate.arch.anatomy import Anatomy, find_anatomy
from abliterate.arch.selfcheck import checked_anatomy
from abliterate.errors import ArchitectureError, ChatTemplateError, ModelLoadError
from abliterate.lm.model import LoadedModel

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    """``None`` means float32 on CPU (fast and exact there) and the checkpoint's own dtype elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device == "cpu" else "auto"
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _gguf_supported_types() -> set[str]:
    import gguf.quants

    return {"F32", "F16"} | {t.name for t in gguf.quants._type_traits}


def check_gguf(path: Path) -> None:
    """Fail early, in one line, on a file that is not a GGUF or holds quant types we cannot dequantize."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic); pass a .gguf model or a model directory")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf reader raises bare ValueError/KeyError on corrupt files
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); re-download or re-export it") from exc
    supported = _gguf_supported_types()
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in supported})
    if bad:
        raise ModelLoadError(
            f"{path.name} uses GGUF quant type(s) {', '.join(bad)} that cannot be dequantized; "
            "re-export it as F16/Q8_0/Q4_K or load the original safetensors checkpoint"
        )


def _classify(source: str) -> tuple[str, Path | None]:
    """Return ("gguf"|"dir"|"hub", local path)."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(
                    f"{source} is a file but not a model: pass a model directory (with config.json) or a .gguf file"
                )
            return "gguf", path.resolve()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source} is a directory without config.json: it is not a transformers model")
        return "dir", path.resolve()
    if not HUB_ID.fullmatch(source) or source.startswith(".") or source.endswith(".gguf"):
        raise ModelLoadError(f"no such file or directory: {source}; check the path")
    return "hub", None


def _prepare_tokenizer(tokenizer: Any, chat_template: str | None, source: str) -> None:
    tokenizer.padding_side = "left"
    if chat_template is not None:
        template_path = Path(chat_template)
        if len(chat_template) < 256 and template_path.suffix == ".jinja" and template_path.is_file():
            chat_template = template_path.read_text()
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{source} has no chat template; pass chat_template='<jinja template or path to .jinja>'"
        )
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError(f"{source}'s tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = fallback


QUANTIZE = ("4bit", "8bit")


def parse_max_memory(spec: str | dict[Any, str] | None) -> dict[Any, str] | None:
    """``"0=20GiB,1=20GiB,cpu=60GiB"`` (GPU indices, ``cpu``, ``mps``, ``disk``) -> accelerate's ``max_memory``."""
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict[Any, str] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        device, sep, amount = part.partition("=")
        device, amount = device.strip(), amount.strip()
        if not sep or not device or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|B)?", amount, re.IGNORECASE):
            raise ModelLoadError(f"bad max_memory entry '{part}'; write DEVICE=AMOUNT, e.g. 0=20GiB,cpu=60GiB")
        out[int(device) if device.isdigit() else device] = amount
    if not out:
        raise ModelLoadError("max_memory is empty; write DEVICE=AMOUNT pairs, e.g. 0=20GiB,cpu=60GiB")
    return out


def bnb_config(quantize: str, dtype: torch.dtype | str) -> Any:
    """A bitsandbytes config for ``"4bit"`` (NF4, computing in ``dtype``) or ``"8bit"`` (LLM.int8)."""
    if quantize not in QUANTIZE:
        raise ModelLoadError(f"unknown quantize '{quantize}'; use 4bit or 8bit (or leave it unset)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"{quantize} loading needs bitsandbytes: pip install bitsandbytes (or drop quantize)")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def clear_gguf_marker(model: torch.nn.Module) -> None:
    """A GGUF-loaded model is fully dequantized, but transformers still flags it as quantized and
    refuses ``save_pretrained``; drop the flag and its quantization config."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "quantization_config", None) is not None:
            del cfg.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def load_model(
    source: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    quantize: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    layers_path: str | None = None,
    writer_patterns: Sequence[str] | None = None,
    verify: bool = True,
    residual_only: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, and locate its residual writers. A vision-language model (a type
    transformers registers as image-text-to-text only) is loaded through ``AutoModelForImageTextToText``; its text
    stack is found and edited (the vision tower and projector are left alone), prompts are text-only through its
    tokenizer, and the chat template falls back to the processor's.

    ``source`` is a hub id, a local model directory or a single ``.gguf`` file (dequantized by
    transformers). ``device`` places the whole model; ``device_map`` (e.g. ``"auto"``) hands
    placement to accelerate instead, with ``max_memory`` (e.g. ``{0: "20GiB", "cpu": "60GiB"}``)
    capping each device; what does not fit is offloaded to the CPU or to disk (``offload_folder``, or the
    checkpoint's own safetensors files) and streamed in layer by layer during each forward pass. Capture,
    runtime edits and evaluation work on such a model; an in-memory weight edit does not (use
    :func:`abliterate.checkpoint.stream_orthogonalize` to write the edited checkpoint).

    ``quantize="4bit"`` or ``"8bit"`` loads the linear layers through bitsandbytes (to fit a big model on
    a GPU for capture and evaluation); residual writers are then not editable in place either, so the
    edited model is written from the original checkpoint by the streaming edit.

    ``layers_path``/``writer_patterns`` name the modules of an architecture the built-in patterns do
    not know. ``verify`` (default on) checks the writers on a probe of a few tokens and discovers the ones
    no pattern names (see :func:`abliterate.arch.selfcheck.checked_anatomy`); ``verify=False`` skips that.

    ``residual_only=True`` is for models no weight edit is exact for (a post-LN residual, sinusoidal positions, a
    gate or per-channel scale on the stream, ...): it needs only one hidden-size residual stream through the layers,
    and :func:`abliterate.ablate` then projects the direction out of that stream at every layer's input and output
    (the direction is then absent from the stream between layers); weight edits through it are refused, and
    ``lm.anatomy.weight_error`` says why a weight edit would not be exact.

    Args:
        source: a hub id, a local model directory or a ``.gguf`` file.
        dtype: ``"float32"``, ``"bfloat16"``, a ``torch.dtype``, or None: float32 on CPU, the checkpoint's dtype
            elsewhere.
        device: the one device for the whole model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).
        device_map: hand placement to accelerate instead (``"auto"``, ``"balanced"``, ``"sequential"`` or a map).
        max_memory: a cap per device with ``device_map`` (``{0: "20GiB", "cpu": "60GiB"}`` or ``"0=20GiB,cpu=60GiB"``).
        offload_folder: where weights that fit nowhere else go.
        quantize: ``"4bit"`` or ``"8bit"`` through bitsandbytes.
        trust_remote_code: run the checkpoint's own modelling code.
        chat_template: a Jinja chat template for a model that has none (or to replace its own).
        layers_path: the module path of the decoder layers, for an architecture no pattern knows.
        writer_patterns: name patterns of the residual writers in each layer, likewise.
        verify: check the writers on a short probe (and discover those no pattern names).
        residual_only: edit the residual stream only (runtime ablation); weight edits are then refused.

    Returns:
        The :class:`~abliterate.lm.model.LoadedModel`: the model, its tokenizer (left padding, a pad token) and its
        anatomy (layers and residual writers).

    Example:
        >>> from abliterate import load_model
        >>> lm = load_model("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16", device="cuda")
        >>> lm.generate(["Say hello."], max_new_tokens=8)
    """
    from transformers import AutoTokenizer

    source = str(source)
    kind, path = _classify(source)
    torch_dtype = resolve_dtype(dtype, device if device_map is None else "auto")
    if max_memory is not None and device_map is None:
        raise ModelLoadError("max_memory needs a device_map (e.g. device_map='auto'); pass both or neither")
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    model_only: dict[str, Any] = {}
    if kind == "gguf":
        assert path is not None
        check_gguf(path)
        where, common["gguf_file"] = str(path.parent), path.name
    else:
        where = str(path) if path else source
    if quantize is not None:
        if kind == "gguf":
            raise ModelLoadError(f"{source} is a GGUF file; quantize= applies to safetensors checkpoints only")
        model_only["quantization_config"] = bnb_config(quantize, torch_dtype)
        device_map = device_map if device_map is not None else {"": device}
    try:
        auto, vlm = model_class(where, common)
        tokenizer = AutoTokenizer.from_pretrained(where, **common)
        if vlm and not getattr(tokenizer, "chat_template", None) and chat_template is None:
            tokenizer.chat_template = processor_chat_template(where, common)
        model = auto.from_pretrained(
            where,
            dtype=torch_dtype,
            device_map=device_map,
            max_memory=parse_max_memory(max_memory),
            **({"offload_folder": str(offload_folder)} if offload_folder is not None else {}),
            **model_only,
            **common,
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "check the hub id and your network, or pass a local directory" if kind == "hub" else "check the files"
        raise ModelLoadError(f"cannot load '{source}': {first}; {hint}") from exc
    if device_map is None:
        model.to(device)
    model.eval()
    if kind == "gguf":
        clear_gguf_marker(model)
    _prepare_tokenizer(tokenizer, chat_template, source)
    anatomy = _anatomy(model, tokenizer, layers_path, writer_patterns, verify, residual_only)
    return LoadedModel(model, tokenizer, anatomy, source, path)


def from_pretrained_objects(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    source: str = "<in-memory>",
    chat_template: str | None = None,
    layers_path: str | None = None,
    writer_patterns: Sequence[str] | None = None,
    verify: bool = True,
    residual_only: bool = False,
) -> LoadedModel:
    """Wrap an already-built transformers model and tokenizer (e.g. one you constructed yourself);
    ``verify`` and ``residual_only`` as in :func:`load_model`."""
    model.eval()
    _prepare_tokenizer(tokenizer, chat_template, source)
    anatomy = _anatomy(model, tokenizer, layers_path, writer_patterns, verify, residual_only)
    return LoadedModel(model, tokenizer, anatomy, source, None)


def model_class(where: str, common: dict[str, Any]) -> tuple[Any, bool]:
    """``(auto class, is a VLM)``: ``AutoModelForImageTextToText`` for a type transformers registers as an
    image-text-to-text model but not as a causal LM (Qwen2-VL, LLaVA, Mistral 3, Idefics3, ...), whose text stack
    is then the one found and edited; ``AutoModelForCausalLM`` otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = getattr(AutoConfig.from_pretrained(where, **common), "model_type", None)
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForImageTextToText, True
    return AutoModelForCausalLM, False


def processor_chat_template(where: str, common: dict[str, Any]) -> str | None:
    """A VLM's chat template often lives with its processor, not its tokenizer."""
    from transformers import AutoProcessor

    try:
        return getattr(AutoProcessor.from_pretrained(where, **common), "chat_template", None)
    except Exception:  # no processor, or one that needs an extra package: the tokenizer's check then says so
        return None


PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def _anatomy(
    model: torch.nn.Module,
    tokenizer: Any,
    layers_path: str | None,
    writer_patterns: Sequence[str] | None,
    verify: bool,
    residual_only: bool = False,
) -> Anatomy:
    if not verify:
        if residual_only:
            raise ArchitectureError("residual_only needs the probe that checks the residual stream; drop verify=False")
        return find_anatomy(model, layers_path=layers_path, writer_patterns=writer_patterns)
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :8]
    return checked_anatomy(
        model,
        ids=ids if ids.shape[-1] >= 2 else None,
        layers_path=layers_path,
        writer_patterns=writer_patterns,
        residual_only=residual_only,
    )
