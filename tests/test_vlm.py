"""Vision-language models: every type transformers registers only as image-text-to-text, built tiny and checked
text-only like the causal LMs (supported, refused in one line, or listed as not buildable tiny with the reason), and
one loaded from disk end to end: through AutoModelForImageTextToText, text-only capture, an edit of the text stack
only, and a saved model the same auto class reloads with the vision weights untouched."""

from __future__ import annotations

import pytest
import torch
from registry import check_type, randomize
from registry_itt import ITT_TYPES, tiny_itt_model
from test_architectures import assert_outcome
from tiny import HARMFUL, HARMLESS, tiny_tokenizer
from transformers import AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

from abliterate import capture, directions, load_model, orthogonalize
from abliterate.lm.saving import save_model

_PIXELS = "its forward needs pixel values (or image features): no text-only forward"
ITT_UNBUILDABLE: dict[str, str] = {
    "apertus1p5": "its config validation rejects every tiny layout tried",
    "blip": _PIXELS,
    "blip-2": _PIXELS,
    "chameleon": "its forward needs the VQ-VAE vocabulary map of a real checkpoint",
    "cohere_compass": "its text config's per-layer rope parameters do not fit a tiny layout",
    "cosmos3_edge": "its config validation rejects every tiny layout tried",
    "deepseek_ocr2": "its forward needs image features: no text-only forward",
    "diffusion_gemma": "a diffusion LM: its forward needs the denoising schedule's top-k, not a causal pass",
    "ernie4_5_vl_moe": "its config validation rejects a tiny MoE layout",
    "fast_vlm": "its vision tower needs the timm package",
    "florence2": "its config validation rejects a tiny patch layout",
    "glm5_next": "its config validation rejects every tiny layout tried",
    "granite4_vision": "its forward needs image features: no text-only forward",
    "hunyuan_vl": "its forward needs image features: no text-only forward",
    "hy_v4_vl": "its config validation rejects every tiny layout tried",
    "idefics": _PIXELS,
    "inkling2": "its config validation rejects every tiny layout tried",
    "inkling2_loop": "its config validation rejects every tiny layout tried",
    "instructblip": _PIXELS,
    "instructblipvideo": _PIXELS,
    "kosmos-2": _PIXELS,
    "molmo2": "its config validation rejects a tiny image size",
    "muse_spark": "its config validation rejects every tiny layout tried",
    "nemotron_h_omni": "its config validation rejects every tiny layout tried",
    "perception_lm": "its vision tower needs the timm package",
    "pi0": "a robot policy: its forward needs the robot state",
    "pi05": "a robot policy: its forward needs the robot state",
    "pix2struct": _PIXELS,
    "pp_formulanet": "an encoder-decoder without text input embeddings",
    "qwen2_5_omni_thinker": "its multimodal rotary sections do not fit a tiny head size",
    "step3p7": "its config needs a sliding window the tiny layout lacks",
    "t5gemma2": "an encoder-decoder: no decoder-only text forward",
    "udop": "an encoder-decoder that needs bounding boxes",
    "vision-encoder-decoder": _PIXELS,
}

ITT_REFUSED: dict[str, str] = {
    # sinusoidal positions: a buffer, not a weight
    "kosmos-2.5": r"transforms the embeddings before the first layer \(text_model\.model\.embed_positions\)",
}


def test_tables_name_registered_types_only():
    assert not (set(ITT_UNBUILDABLE) | set(ITT_REFUSED)) - set(ITT_TYPES)
    assert not set(ITT_UNBUILDABLE) & set(ITT_REFUSED)


@pytest.mark.parametrize("model_type", [t for t in ITT_TYPES if t not in ITT_UNBUILDABLE])
def test_vlm_architecture(model_type):
    assert_outcome(check_type(model_type, tiny_itt_model), ITT_REFUSED)


@pytest.mark.parametrize("model_type", sorted(ITT_UNBUILDABLE))
def test_unbuildable_vlms_still_fail(model_type):
    """A listed type that builds and runs now must move to the tested ones."""
    assert check_type(model_type, tiny_itt_model).status == "unbuildable"


def tiny_llava(vocab: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 32,
    }
    config = LlavaConfig(
        text_config={"model_type": "llama", **text},
        vision_config={"model_type": "clip_vision_model", **vision},
        image_token_id=vocab - 1,
        vision_feature_layer=-1,
    )
    return randomize(LlavaForConditionalGeneration(config))


def test_load_edit_and_save_a_vlm(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_llava(len(tokenizer) + 1)
    model.save_pretrained(tmp_path / "vlm")
    tokenizer.save_pretrained(tmp_path / "vlm")
    lm = load_model(tmp_path / "vlm")
    assert isinstance(lm.model, LlavaForConditionalGeneration)
    assert lm.anatomy.layers_path == "model.language_model.layers" and lm.anatomy.verified
    names = [w.name for w in [*lm.anatomy.embeddings, *lm.anatomy.all_writers()]]
    assert names and not [n for n in names if "vision" in n or "projector" in n]
    acts = capture(lm, HARMFUL[:4], HARMLESS[:4], batch_size=4)
    r = directions.mean_diff(acts)[1]
    vision = {
        k: v.clone() for k, v in lm.model.state_dict().items() if "language_model" not in k and "lm_head" not in k
    }
    report = orthogonalize(lm, r)
    assert report.edited and all("language_model" in n for n in report.edited)
    save_model(lm, tmp_path / "out")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert isinstance(reloaded, LlavaForConditionalGeneration)
    state = reloaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in vision.items()), "the vision tower must be untouched"
    ids = torch.tensor([[5, 17, 33, 90, 100, 7]])
    with torch.no_grad():
        want = lm.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        before = model(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5
    assert (got - before).abs().max() > 1e-3


def test_a_vlm_without_a_text_stack_the_tool_can_find_is_one_line(tmp_path):
    """Layer stacks only inside the vision tower: refused, naming them, never edited as if they were the text."""
    from torch import nn

    from abliterate import ArchitectureError
    from abliterate.arch.selfcheck import checked_anatomy

    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    class TextlessVLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_tower = Tower()
            self.embed = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def forward(self, input_ids):
            return self.head(self.embed(input_ids))

    with pytest.raises(ArchitectureError) as exc:
        checked_anatomy(TextlessVLM())
    msg = str(exc.value)
    assert "\n" not in msg and "cannot find the text decoder layers of TextlessVLM" in msg
    assert "belong to a vision or audio tower (vision_tower.layers)" in msg and "layers_path=" in msg
