"""The edit space as data: kernels over layers, EditSpec validation and JSON round trips, writer kinds."""

from __future__ import annotations

import json
import math

import pytest
from tiny import FAMILIES, tiny_lm

from abliterate import directions
from abliterate.arch.anatomy import writer_kind
from abliterate.edit.spec import FLAT, METHODS, EditSpec, Kernel
from abliterate.errors import AbliterateError


def one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 300, msg
    for w in words:
        assert w in msg, msg


def test_kernel_is_a_tent_with_a_floor():
    k = Kernel(peak=4.5, max_weight=1.2, edge_weight=0.4, width=2.0)
    w = k.weights(10)
    assert len(w) == 10
    assert w[:2] == [0.0, 0.0] and w[7:] == [0.0, 0.0, 0.0]  # |i - 4.5| > 2
    assert w[4] == w[5] == pytest.approx(1.2 + (0.4 - 1.2) * 0.25)  # distance 0.5 of 2
    assert w[3] == w[6] == pytest.approx(1.2 + (0.4 - 1.2) * 0.75)
    assert Kernel(3.0, 1.0, 0.2, 2.0).weights(8)[1] == pytest.approx(0.2)  # exactly at the edge: the floor
    assert Kernel(3.0, 0.9, 0.1, 0.0).weights(6) == [0, 0, 0, 0.9, 0, 0]  # zero width: the peak layer only
    assert FLAT.weights(5) == [1.0] * 5


def test_spec_round_trips_through_strict_json():
    spec = EditSpec(
        method="slerp",
        slerp_t=0.6,
        position="gen",
        direction_index=7.25,
        k=3,
        attn=Kernel(5.0, 1.1, 0.3, 4.0),
        mlp=None,
        embedding=0.5,
        norm_preserving=True,
    )
    for s in (spec, EditSpec(), EditSpec.full(4, "projected", -2)):
        text = json.dumps(s.to_dict(), allow_nan=False)  # an infinite width must not leak into the JSON
        back = EditSpec.from_dict(json.loads(text))
        assert back == s and hash(back) == hash(s)
    assert EditSpec.from_dict({"k": 2}) == EditSpec(k=2)  # missing fields take their defaults


def test_full_is_the_classic_edit():
    s = EditSpec.full(14, "slerp", -2, slerp_t=0.5)
    assert (s.method, s.slerp_t, s.position, s.direction_index, s.k) == ("slerp", 0.5, -2, 14.0, 1)
    assert s.attn.weights(24) == s.mlp.weights(24) == [1.0] * 24 and s.embedding == 1.0
    assert s.edits_anything and not EditSpec().edits_anything


def test_methods_match_the_direction_methods():
    assert set(METHODS) == set(directions.METHODS)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (EditSpec(method="pca"), "method"),
        (EditSpec(method="slerp", slerp_t=0.0), "slerp_t"),
        (EditSpec(slerp_t=float("nan")), "slerp_t"),
        (EditSpec(position=-3), "position"),
        (EditSpec(position=True), "position"),
        (EditSpec(direction_index=12.5), "direction_index"),
        (EditSpec(direction_index=-0.5), "direction_index"),
        (EditSpec(k=0), "k"),
        (EditSpec(k=2.0), "k"),
        (EditSpec(k=12), "k"),
        (EditSpec(attn=Kernel(11.5, 1.0, 0.5, 2.0)), "attn.peak"),
        (EditSpec(mlp=Kernel(3.0, -1.0, 0.5, 2.0)), "mlp.max_weight"),
        (EditSpec(mlp=Kernel(3.0, 1.0, float("inf"), 2.0)), "mlp.edge_weight"),
        (EditSpec(attn=Kernel(3.0, 1.0, 0.5, -1.0)), "attn.width"),
        (EditSpec(attn={"peak": 1}), "attn"),
        (EditSpec(embedding=-0.1), "embedding"),
        (EditSpec(norm_preserving=1), "norm_preserving"),
    ],
)
def test_validate_names_the_bad_field(spec, field):
    with pytest.raises(AbliterateError) as exc:
        spec.validate(10, [-1, -2])
    one_line(exc, f"'{field}'")


def test_validate_accepts_the_edges():
    EditSpec(direction_index=10.0, k=11, attn=Kernel(9.0, 0.0, 0.0, math.inf), embedding=2.0).validate(10, [-1])
    EditSpec(position="gen", attn=Kernel(0.0, 1.5, 0.0, 0.0)).validate(10, [-1, "gen"])


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"kk": 2}, ["unknown edit spec field", "kk"]),
        ({"attn": {"peak": 1.0, "max_weight": 1.0}}, ["'attn'", "edge_weight"]),
        ({"mlp": [1, 2, 3, 4]}, ["'mlp'"]),
        ({"k": "2"}, ["'k'"]),
        ({"direction_index": "middle"}, ["'direction_index'"]),
        ([1, 2], ["table"]),
    ],
)
def test_from_dict_rejects_bad_tables(data, words):
    with pytest.raises(AbliterateError) as exc:
        EditSpec.from_dict(data)
    one_line(exc, *words)


def test_label_names_the_choices():
    text = EditSpec(method="slerp", slerp_t=0.5, direction_index=3.5, k=2, mlp=Kernel(2, 1, 0.5, 3)).label()
    for word in ("slerp(t=0.5)", "dir 3.50", "k=2", "attn off", "mlp 1.00@2.0", "emb 0"):
        assert word in text, text
    assert "own layer" in EditSpec().label() and "norm-preserving" in EditSpec(norm_preserving=True).label()


def test_writer_kind_from_the_module_name():
    assert writer_kind("self_attn.o_proj") == writer_kind("mixer.out_proj") == "attn"
    assert writer_kind("mlp.experts.3.down_proj") == writer_kind("block_sparse_moe.experts.w2") == "mlp"
    assert writer_kind("feed_forward.w2") == writer_kind("mlp.shared_expert.down_proj") == "mlp"
    assert writer_kind("block.out") == "other"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_has_attention_and_mlp_writers(family):
    lm = tiny_lm(family)
    for ws in lm.anatomy.writers:
        kinds = [w.kind for w in ws]
        assert kinds.count("attn") == 1 and kinds.count("mlp") == len(kinds) - 1 >= 1, kinds
    assert {w.kind for w in lm.anatomy.embeddings} == {"embedding"}
