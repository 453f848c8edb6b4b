"""Multi-direction subspaces and the choice of k."""

from __future__ import annotations

import pytest
import torch
from test_select_sweep import VAL_H, VAL_L
from tiny import HARMFUL, HARMLESS, tiny_lm

from abliterate import DirectionError, ablate, capture
from abliterate.select.subspace import choose_k, neighbour_layers, pca


@pytest.fixture(scope="module")
def lm_acts():
    lm = tiny_lm("llama")
    return lm, capture(lm, HARMFUL, HARMLESS, keep_per_prompt=True)


def test_pca_basis_is_orthonormal_and_aligned(lm_acts):
    lm, acts = lm_acts
    d = pca(acts, 2, -1, k=3)
    assert d.vector.shape == (3, lm.hidden_size)
    assert torch.allclose(d.vector @ d.vector.T, torch.eye(3), atol=1e-5)
    diff = (acts.harmful_mean[2, 0] - acts.harmless_mean[2, 0]).float()
    assert float(d.vector[0] @ diff) > 0


def test_pca_needs_per_prompt_activations(lm_acts):
    lm, _ = lm_acts
    with pytest.raises(DirectionError, match="keep_per_prompt"):
        pca(capture(lm, HARMFUL, HARMLESS), 1)
    with pytest.raises(DirectionError, match="k must be"):
        pca(lm_acts[1], 1, k=0)


def test_neighbour_layers_subspace(lm_acts):
    lm, acts = lm_acts
    d = neighbour_layers(acts, 2, k=2)
    assert d.vector.shape == (2, lm.hidden_size)
    assert torch.allclose(d.vector @ d.vector.T, torch.eye(2), atol=1e-5)


def test_choose_k_scores_every_k_and_ablation_removes_the_whole_subspace(lm_acts):
    lm, acts = lm_acts
    choice = choose_k(lm, acts, VAL_H, VAL_L, layer=2, ks=(1, 2, 3), kl_threshold=100.0)
    assert [s.k for s in choice.scores] == [1, 2, 3]
    assert all(s.kl >= 0 and s.passed for s in choice.scores)
    assert choice.chosen_k == min(choice.scores, key=lambda s: s.bypass).k
    assert choice.direction is not None and choice.direction.k == choice.chosen_k
    basis = choice.direction.vector
    batch = lm.encode(lm.format(HARMFUL[:2]))
    with ablate(lm, choice.direction), torch.inference_mode():
        hs = lm.model(**batch, output_hidden_states=True).hidden_states
    assert max(float((h @ basis.T).abs().max()) for h in hs[: lm.num_layers]) < 1e-4
    none = choose_k(lm, acts, VAL_H, VAL_L, layer=2, ks=(1,), kl_threshold=-1.0)
    assert none.chosen_k is None and none.direction is None
    assert none.to_dict()["scores"][0]["k"] == 1
