"""The pattern tables anatomy is described by: where decoder layers live, which modules inside a layer write into
the residual stream, which norms follow a write (post-norms), and what kind of writer a module is. Data only;
:mod:`abliterate.arch.anatomy` applies it and :mod:`abliterate.arch.discovery` finds what it misses."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Where the list of decoder layers may live, tried in order (VLM wrappers one level deeper).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "model.language_model.model.layers",
    "language_model.model.layers",
    "model.text_model.layers",
    "text_model.model.layers",  # Kosmos-2.5
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "backbone.layers",  # Mamba, Mamba-2, FalconMamba
    "backbone.blocks",  # xLSTM
    "biogpt.layers",
    "gpt_neox_japanese.layers",
    "rwkv.blocks",
    "cpmant.encoder.layers",
    "bert.encoder.layer",  # BERT-likes used as decoders (pre-LN ones verify)
    "roberta.encoder.layer",
)

_ATTN = (
    r"(self_attn|attn|attention|self_attention|mixer|linear_attn|temporal_block|conv|mamba|mlstm_layer"
    r"|attn\.attention|norm_attn_norm\.attn|self_att\.self_attention|self_attn\.\d+|mamba_decoder\.mamba"
    r"|attention\.output)"
)
_MLP = r"(mlp|feed_forward|block_sparse_moe|ffn|moe|mlp_block|shared_mlp|mixer|ffn\.ffn|ffn\.experts|mlps\.\d+)"
_DOWN = r"(down_proj|c_proj|dense_4h_to_h|fc2|fc_out|w2|wo|Wo|w_out|output_linear|proj_down)"

# Relative names (within one decoder layer) of modules or parameters (fused experts) that write to the residual.
WRITER_PATTERNS: tuple[str, ...] = (
    rf"{_ATTN}\.(o_proj|out_proj|c_proj|dense|wo|o_b_proj|linear_out|attention_out|o_proj\.linear)",
    rf"{_MLP}\.{_DOWN}",
    rf"{_MLP}\.(shared_experts?|shared_mlp)\.{_DOWN}",
    rf"{_MLP}\.experts\.\d+\.{_DOWN}",
    rf"{_MLP}\.experts\.{_DOWN}",  # fused experts: a 3-D parameter of the experts module
    rf"{_MLP}\.experts\.mlp\.{_DOWN}",  # DBRX: a 2-D [experts * inner, hidden] parameter
    rf"({_MLP}|{_ATTN}\.experts)\.output_linear\.weight",  # JetMoE: fused experts of the MoE and of the attention
    r"attn\.Wo",  # ModernBERT decoder (its MLP's Wo is a down-projection)
    r"fc2",  # OPT, XGLM, BioGPT and the decoders of encoder-decoders: the MLP's output on the layer itself
    r"per_layer_projection",  # Gemma 3n / 4: the per-layer embedding's projection
    r"output\.dense",  # BERT-likes: the feed-forward's output
)

# Learned absolute position embeddings also write into the residual stream.
POSITION_EMBEDDING_PATTERNS: tuple[str, ...] = (
    r"(.*\.)?wpe",
    r"(.*\.)?embed_positions",
    r"(.*\.)?positions_embed",
    r"(.*\.)?position_embeddings",
    r"(.*\.)?(token_type_embeddings|segment_embedding)",  # constant rows (type 0) added to every token
)

# Norms applied to the embeddings before the first layer (BLOOM, the ModernBERT decoder): the embeddings' post-norm.
# A LayerNorm's bias there is a writer of its own (see BIAS_WRITERS).
EMBEDDING_NORM_PATTERNS: tuple[str, ...] = (r"(.*\.)?word_embeddings_layernorm", r"(.*\.)?embeddings\.norm")

# 1-D hidden-size parameters added to the residual stream outside any Linear, relative to a decoder layer, with the
# module (relative to the layer) whose first output carries them and the writer kind: GPT-NeoX-Japanese's attention
# ``dense_bias`` (returned next to the attention output and added by the layer), JetMoE's MoE and
# mixture-of-attention biases (added after the experts).
BIAS_WRITERS: tuple[tuple[str, str, str], ...] = (
    (r"attention\.dense_bias", "attention", "attn"),
    (r"self_attention\.experts\.bias", "self_attention", "attn"),
    (r"mlp\.bias", "mlp", "mlp"),
)

# Modules of a vision or audio tower are never text writers, whatever their width.
OTHER_TOWERS = r"(^|\.)(vision|visual|image|audio|vit|siglip)[^.]*(\.|$)"


@dataclass(frozen=True)
class PostNormSpec:
    """Layers that normalize a writer's output before adding it (Gemma 2/3/4, OLMo 2/3, GLM-4, EXAONE 4, ...).

    The rule applies to a layer that has every attribute in ``requires``; ``norms`` maps a writer pattern to
    the attribute path of the norm applied to that writer's output. The first rule that applies wins.
    """

    requires: tuple[str, ...]
    norms: tuple[tuple[str, str], ...]


_ATTN_ANY, _MLP_ANY = rf"{_ATTN}\..*", rf"{_MLP}\..*"
POST_NORMS: tuple[PostNormSpec, ...] = (
    # Gemma 2/3/4, OLMo 2/3, EXAONE 4, FlexOlmo, OLMo-hybrid attention layers, ...
    PostNormSpec(
        ("post_attention_layernorm", "post_feedforward_layernorm"),
        ((_ATTN_ANY, "post_attention_layernorm"), (_MLP_ANY, "post_feedforward_layernorm")),
    ),
    # GLM-4, Kolibri (post_attention_layernorm is the MLP's pre-norm there)
    PostNormSpec(
        ("post_self_attn_layernorm", "post_mlp_layernorm"),
        ((_ATTN_ANY, "post_self_attn_layernorm"), (_MLP_ANY, "post_mlp_layernorm")),
    ),
    # AFMoE
    PostNormSpec(
        ("post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm"),
        ((_ATTN_ANY, "post_attention_layernorm"), (_MLP_ANY, "post_mlp_layernorm")),
    ),
    # HyperCLOVA X
    PostNormSpec(("post_norm1", "post_norm2"), ((_ATTN_ANY, "post_norm1"), (_MLP_ANY, "post_norm2"))),
    # LFM 3: the operator (conv or attention) and the feed-forward are each post-normed
    PostNormSpec(
        ("post_operator_norm", "post_ffn_norm"), ((_ATTN_ANY, "post_operator_norm"), (_MLP_ANY, "post_ffn_norm"))
    ),
    # AXK1: the MoE block normalizes its own output
    PostNormSpec(("mlp.post_mlp_layernorm",), ((_MLP_ANY, "mlp.post_mlp_layernorm"),)),
    # Inkling / Inkling 2: a depthwise causal convolution (plus its skip) after the attention and after the MLP; not
    # a norm but a per-channel filter, whose taps writer_basis reads off
    PostNormSpec(("attn_sconv", "mlp_sconv"), ((_ATTN_ANY, "attn_sconv"), (_MLP_ANY, "mlp_sconv"))),
    PostNormSpec(
        ("post_attention_convolution", "post_mlp_convolution"),
        ((_ATTN_ANY, "post_attention_convolution"), (_MLP_ANY, "post_mlp_convolution")),
    ),
)
# Gemma 3n / 4: the per-layer embedding's projection has its own post-norm (matched in any layer).
PER_LAYER_POST_NORMS: tuple[tuple[str, str], ...] = ((r"per_layer_projection", "post_per_layer_input_norm"),)


def writer_kind(rel: str) -> str:
    """``"mlp"`` or ``"attn"`` for a writer's module name relative to its decoder layer, else ``"other"``.
    An MLP writer is a down-projection (of an MLP, an expert, a shared expert) or a layer-level ``fc2``; a token
    mixer's (attention, Mamba/SSM, conv, linear attention) out-projection is ``"attn"``."""
    if re.fullmatch(rf"({_MLP}\.(.*\.)?{_DOWN}(\..*)?|fc2|output\.dense)", rel):
        return "mlp"
    return "attn" if re.match(rf"{_ATTN}\.", rel) else "other"
