"""Runtime ablation == weight orthogonalization, for every supported family."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from tiny import FAMILIES, HARMFUL, HARMLESS, tiny_lm
from transformers import AutoModelForCausalLM

from abliterate import ablate, add, bake_induction, capture, directions, induce, orthogonalize
from abliterate.lm.loading import from_pretrained_objects

ALL = list(FAMILIES)


def logits(lm, prompts=HARMLESS[:3]):
    batch = lm.encode(lm.format(prompts))
    with torch.inference_mode():
        return lm.model(**batch).logits


def clone(lm):
    return from_pretrained_objects(copy.deepcopy(lm.model), lm.tokenizer, source=lm.source)


@pytest.fixture(scope="module", params=ALL)
def setup(request):
    lm = tiny_lm(request.param)
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=4)
    r = directions.mean_diff(acts)[lm.num_layers // 2]
    return lm, acts, r


def test_ablation_equals_orthogonalization(setup):
    lm, _, r = setup
    base = logits(lm)
    with ablate(lm, r):
        runtime = logits(lm)
    assert (runtime - base).abs().max() > 1e-3, "ablation must change the model"
    edited = clone(lm)
    report = orthogonalize(edited, r)
    assert len(report.edited) >= 2 * lm.num_layers + 1
    assert (logits(edited) - runtime).abs().max() < 1e-4
    assert torch.equal(logits(lm), base), "the original model must be untouched and hooks removed"


def test_residual_has_no_component_after_ablation(setup):
    lm, _, r = setup
    u = r.vector
    batch = lm.encode(lm.format(HARMFUL[:3]))
    seen = []
    with ablate(lm, r), torch.inference_mode():
        out = lm.model(**batch, output_hidden_states=True)
        # every layer input as recorded by transformers (must see the ablated values)
        for h in out.hidden_states[: lm.num_layers]:
            seen.append((h.float() @ u).abs().max() / h.float().norm(dim=-1).max())
    with ablate(lm, r):
        acts = capture(lm, HARMFUL, HARMLESS, positions=[-1, -2], batch_size=3)
    proj = (acts.harmful_mean.float() @ u).abs()
    assert max(seen) < 1e-5
    assert proj.max() < 1e-4 * acts.harmful_mean.norm(dim=-1).max()


def test_generation_with_kv_cache_matches(setup):
    lm, _, r = setup
    edited = clone(lm)
    orthogonalize(edited, r)
    with ablate(lm, r):
        runtime = lm.generate(HARMFUL[:2], max_new_tokens=6)
    assert runtime == edited.generate(HARMFUL[:2], max_new_tokens=6)


def test_saved_model_reloads_with_plain_transformers(setup, tmp_path):
    lm, _, r = setup
    edited = clone(lm)
    orthogonalize(edited, r)
    out = edited.save(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = edited.encode(edited.format(HARMLESS[:2]))
    with torch.inference_mode():
        assert (reloaded(**batch).logits - edited.model(**batch).logits).abs().max() < 1e-5


def test_induction_runtime_equals_baked_bias(setup):
    lm, acts, r = setup
    layer = lm.num_layers - 1
    c = float(acts.harmful_mean[layer, 0].float() @ r.vector)
    with induce(lm, r, c, layers=range(layer + 1)):
        induced = capture(lm, HARMFUL, HARMLESS, batch_size=6)
    proj = induced.harmless_mean[: layer + 1, 0].float() @ r.vector
    assert torch.allclose(proj, torch.full_like(proj, c), atol=1e-4)
    with ablate(lm, r, layers=range(layer), embeddings=True), add(lm, r, c, layers=[0]):
        runtime = logits(lm)
    baked = clone(lm)
    bake_induction(baked, r, c, through_layer=layer)
    assert (logits(baked) - runtime).abs().max() < 1e-4
    proj = capture(baked, HARMFUL, HARMLESS, batch_size=6).harmful_mean[: layer + 1, 0].float() @ r.vector
    assert torch.allclose(proj, torch.full_like(proj, c), atol=1e-4)


def test_norm_preserving_keeps_column_norms(setup):
    lm, _, r = setup
    edited = clone(lm)
    orthogonalize(edited, r, norm_preserving=True)
    for w_old, w_new in zip(lm.anatomy.all_writers(), edited.anatomy.all_writers(), strict=True):
        old, new = w_old.weight.movedim(w_old.out_axis, -1), w_new.weight.movedim(w_new.out_axis, -1)
        assert torch.allclose(old.norm(dim=-1), new.norm(dim=-1), rtol=1e-4, atol=1e-6)
    # the edited writers no longer write the direction (post-norm families: after their norm)
    batch = lm.encode(lm.format(HARMFUL[:2]))
    with torch.inference_mode():
        hs = edited.model(**batch, output_hidden_states=True).hidden_states
    u = r.vector
    assert max(float((h @ u).abs().max() / h.norm(dim=-1).max()) for h in hs[: lm.num_layers]) < 1e-5


def test_plain_transformers_subprocess_without_abliterate(tmp_path):
    lm = tiny_lm("qwen2")
    acts = capture(lm, HARMFUL, HARMLESS)
    r = directions.mean_diff(acts)[1]
    orthogonalize(lm, r)
    out = lm.save(tmp_path / "m")
    expected = logits(lm, ["hello"])[0, -1, :5].tolist()
    code = (
        "import sys, torch, json\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"p = {str(out)!r}\n"
        "tok = AutoTokenizer.from_pretrained(p)\n"
        "m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()\n"
        "t = tok.apply_chat_template([{'role':'user','content':'hello'}], tokenize=False, add_generation_prompt=True)\n"
        "ids = tok(t, return_tensors='pt', add_special_tokens=False)\n"
        "assert 'abliterate' not in sys.modules\n"
        "print(json.dumps(m(**ids).logits[0, -1, :5].tolist()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = [float(x) for x in res.stdout.strip().splitlines()[-1].strip("[]").split(",")]
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-5
