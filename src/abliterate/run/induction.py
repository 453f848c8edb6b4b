"""``run`` with a behaviour profile whose goal is ``induce``: bake the sweep's direction into the weights.

The sweep's chosen direction (the candidate that raises the behaviour score on plain prompts the most,
among those passing the filters) is pinned, at the input of every layer up to its own, to the behaviour
prompts' mean projection onto it (:func:`abliterate.edit.weights.bake_induction`: the writers before it are
orthogonalized and the embedding carries the component as a bias), so that plain transformers loads the
result. ``abliterate apply --mode induce`` makes the same edit from a saved direction file.
"""

from __future__ import annotations

from typing import Any

from abliterate.edit.weights import bake_induction
from abliterate.errors import AbliterateError
from abliterate.lm.model import LoadedModel
from abliterate.measure.capture import Activations
from abliterate.select.sweep import Selection


def induction_of(sel: Selection, acts: Activations) -> dict[str, Any]:
    """The induction ``run`` bakes: the chosen direction's layer, position, method and coefficient."""
    chosen = sel.chosen
    if chosen is None:
        raise AbliterateError(f"no direction to induce: {sel.note}")
    direction = sel.direction(chosen)
    p = acts.position_index(chosen.position)
    coefficient = float(acts.harmful_mean[chosen.layer, p].float() @ direction.vector.float())
    return {
        "goal": "induce",
        "method": chosen.method,
        "layer": chosen.layer,
        "position": chosen.position,
        "coefficient": coefficient,
        "through_layer": chosen.layer,
        "note": (
            f"{chosen.method} direction of layer {chosen.layer} (position {chosen.position}) pinned to "
            f"{coefficient:.3f} at the inputs of layers 0..{chosen.layer}"
        ),
    }


def bake_chosen(lm: LoadedModel, sel: Selection, acts: Activations) -> dict[str, Any]:
    """Bake the sweep's induction into ``lm``'s weights (in place); returns its record (for edit.json)."""
    record = induction_of(sel, acts)
    layer = min(record["through_layer"], lm.num_layers - 1)
    record["through_layer"] = layer
    bake_induction(lm, sel.direction(sel.chosen), record["coefficient"], through_layer=layer)
    return record
