"""Self-verified anatomy and writer discovery on toy architectures no name pattern describes."""

from __future__ import annotations

import pytest
import torch
from tiny import HARMFUL, tiny_model, tiny_tokenizer
from torch import nn

from abliterate import ArchitectureError, LoadedModel, ablate, orthogonalize
from abliterate.arch import find_anatomy
from abliterate.arch.selfcheck import checked_anatomy
from abliterate.arch.verify import probe_ids, verify_anatomy
from abliterate.lm import from_pretrained_objects

HID, VOCAB = 16, 50


class ToyRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.5 * torch.randn(HID))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Block(nn.Module):
    """``kind`` says how the writer ``out`` reaches the residual: plainly, through an RMSNorm of an unknown
    class (``post_norm``), with a norm on the sum (``post_ln``), times a per-channel gate (``gate``), or next
    to a constant no module outputs (``constant``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(HID)
        self.mix = nn.Linear(HID, 2 * HID)
        self.out = nn.Linear(2 * HID, HID)
        self.post = ToyRMSNorm()
        self.gate = nn.Parameter(1 + 0.5 * torch.randn(HID))
        self.constant = nn.Parameter(torch.randn(HID))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.out(torch.tanh(self.mix(self.norm(x))))
        if self.kind == "post_norm":
            return x + self.post(h)
        if self.kind == "post_ln":
            return self.post(x + h)
        if self.kind == "gate":
            return x + self.gate * h
        if self.kind == "constant":
            return x + h + self.constant
        return x + h


class Toy(nn.Module):
    """Layers at ``trunk.stack`` (no known path) with a writer named ``out`` (no known pattern)."""

    def __init__(self, kind: str = "plain", embedding_norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(VOCAB, HID)
        self.emb_norm = nn.LayerNorm(HID) if embedding_norm else None
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList([Block(kind) for _ in range(2)])

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def get_output_embeddings(self) -> None:
        return None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        for block in self.trunk.stack:
            x = block(x)
        return x


def residual_component(model: nn.Module, lm: LoadedModel, u: torch.Tensor) -> float:
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    seen = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: seen.append(out)) for layer in lm.anatomy.layers]
    with torch.inference_mode(), ablate(lm, u):
        model(ids)
    for h in hooks:
        h.remove()
    return max(float((h @ u).abs().max() / h.norm(dim=-1).max()) for h in seen)


def unit(seed: int = 3) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(HID, generator=torch.Generator().manual_seed(seed)), dim=0)


def test_discovery_finds_layers_and_writers_no_pattern_names():
    toy = Toy().eval()
    with pytest.raises(ArchitectureError):  # the patterns alone know neither the layer list nor the writer
        find_anatomy(toy)
    anatomy = checked_anatomy(toy)
    assert anatomy.layers_path == "trunk.stack" and anatomy.verified
    assert [[(w.name, w.out_axis, w.bias, w.post_norm) for w in ws] for ws in anatomy.writers] == [
        [(f"trunk.stack.{i}.out", 0, "bias", None)] for i in range(2)
    ]
    assert anatomy.discovered == ["trunk.stack.0.out", "trunk.stack.1.out"]
    lm = LoadedModel(toy, None, anatomy, "toy")
    assert residual_component(toy, lm, unit()) < 1e-5


def test_discovery_finds_an_unknown_post_norm():
    toy = Toy("post_norm").eval()
    # named by the user but without its post-norm, the writer does not explain the layer: ablation leaks
    with pytest.raises(ArchitectureError, match=r"layer 0 of Toy: after ablating a random direction from its writers"):
        checked_anatomy(toy, writer_patterns=["out"])
    anatomy = checked_anatomy(toy)
    assert [[(w.name, w.post_norm) for w in ws] for ws in anatomy.writers] == [
        [(f"trunk.stack.{i}.out", toy.trunk.stack[i].post)] for i in range(2)
    ]
    lm = LoadedModel(toy, None, anatomy, "toy")
    u = unit()
    assert residual_component(toy, lm, u) < 1e-5
    # the weight edit through that post-norm is exact too
    edited = Toy("post_norm").eval()
    edited_lm = LoadedModel(edited, None, checked_anatomy(edited), "toy")
    orthogonalize(edited_lm, u)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.inference_mode(), ablate(lm, u):
        assert (edited(ids) - toy(ids)).abs().max() < 1e-5


def test_post_ln_residual_is_refused_in_one_line():
    with pytest.raises(ArchitectureError) as exc:
        checked_anatomy(Toy("post_ln").eval())
    msg = str(exc.value)
    assert "\n" not in msg and "post-LN" in msg and "post's output" in msg and "cannot edit" in msg


def test_gated_write_is_refused():
    with pytest.raises(ArchitectureError, match=r"layer 0 of Toy: after ablating .* still in the layer"):
        checked_anatomy(Toy("gate").eval())


def test_unexplained_update_names_layer_fraction_and_candidates():
    with pytest.raises(ArchitectureError) as exc:
        checked_anatomy(Toy("constant").eval())
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("layer 0 of Toy: ")
    assert "% of its residual update is not written" in msg and "hidden-size output: out" in msg


def test_transformed_embeddings_are_refused():
    with pytest.raises(ArchitectureError, match=r"transforms the embeddings before the first layer \(emb_norm\)"):
        checked_anatomy(Toy(embedding_norm=True).eval())


def test_verification_reports_per_layer_numbers():
    model = tiny_model("llama")
    full = find_anatomy(model)
    check = verify_anatomy(model, full)
    assert check.ok and len(check.layers) == 3 and not check.not_run
    assert all(c.unexplained < 1e-6 and c.leak < 1e-5 for c in check.layers)
    partial = find_anatomy(model, writer_patterns=[r"mlp\.down_proj"])
    check = verify_anatomy(model, partial)
    assert not check.ok and [c.layer for c in check.failed] == [0, 1, 2]
    assert all(0.05 < c.unexplained < 1 for c in check.failed)


def test_half_precision_model_verifies():
    model = tiny_model("qwen2").to(torch.bfloat16)
    lm = from_pretrained_objects(model, tiny_tokenizer())
    assert lm.anatomy.verified and all(len(ws) == 2 for ws in lm.anatomy.writers)
    with pytest.raises(ArchitectureError, match="not written"):
        from_pretrained_objects(model, tiny_tokenizer(), writer_patterns=[r"mlp\.down_proj"])


def test_verify_false_skips_the_probe(monkeypatch):
    from abliterate.arch import selfcheck

    def boom(*_a, **_k):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(selfcheck, "verify_anatomy", boom)
    lm = from_pretrained_objects(tiny_model("llama"), tiny_tokenizer(), verify=False)
    assert not lm.anatomy.verified
    with pytest.raises(AssertionError, match="the probe ran"):
        from_pretrained_objects(tiny_model("llama"), tiny_tokenizer())


def test_writer_pattern_overrides_that_cannot_be_writers_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ArchitectureError, match=r"writer pattern 'mlp\\\.nothing' matches no module of layer 0"):
        find_anatomy(model, writer_patterns=[r"mlp\.nothing"])
    with pytest.raises(ArchitectureError, match=r"matches mlp\.up_proj \(Linear\), whose output is not the hidden"):
        from_pretrained_objects(model, tiny_tokenizer(), writer_patterns=[r"mlp\.(up|down)_proj", r"self_attn\.o_proj"])


def test_probe_ids_avoid_low_special_ids_and_stay_in_vocabulary():
    ids = probe_ids(tiny_model("llama"))
    assert ids.shape == (1, 8) and int(ids.min()) >= 3 and int(ids.max()) < 320
    lm = from_pretrained_objects(tiny_model("gpt2"), tiny_tokenizer())
    batch = lm.encode(lm.format(HARMFUL[:1]))
    assert lm.anatomy.verified and batch["input_ids"].shape[0] == 1


def test_opt_with_post_layer_norm_is_refused():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.OPTConfig(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=96,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        do_layer_norm_before=False,  # OPT-350m: each layer normalizes the sum
    )
    model = tf.OPTForCausalLM(config).eval()
    with pytest.raises(ArchitectureError, match=r"OPTForCausalLM normalizes the residual stream .* post-LN"):
        from_pretrained_objects(model, tiny_tokenizer())
    lm = from_pretrained_objects(
        tf.OPTForCausalLM(tf.OPTConfig(**{**config.to_dict(), "do_layer_norm_before": True})), tiny_tokenizer()
    )
    assert [w.name for w in lm.anatomy.writers[0]] == [
        "model.decoder.layers.0.self_attn.out_proj",
        "model.decoder.layers.0.fc2",
    ]
