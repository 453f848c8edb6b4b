"""Why a norm-preserving edit has no exact PEFT adapter: the best DoRA attempt, measured in logits.

A norm-preserving edit rescales each *input* unit of a writer (each column of ``o_proj``) by its own factor; PEFT's
DoRA magnitude rescales *output* features (the rows of ``W + B A``). On a tiny random Mistral (k=2, flat attention
kernel, random directions) this sets ``B A`` to the projection and the magnitude to the edited weight's own row
norms, the closest DoRA gets, and prints max |Δlogit| against the weight edit; ``--plain`` runs the same harness
on the edit without norm preservation, where DoRA is exact.

    PYTHONPATH=src python3 bench/dora_axis.py [--plain]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import tiny_lm, tiny_model  # noqa: E402

from abliterate.edit.plan import Directions, apply_plan, build_plan  # noqa: E402
from abliterate.edit.spec import EditSpec, Kernel  # noqa: E402
from abliterate.measure.directions import DirectionSet  # noqa: E402


def main() -> None:
    import peft

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="the edit without norm preservation")
    args = parser.parse_args()
    lm = tiny_lm("mistral")
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(lm.num_layers + 1, 1, lm.hidden_size, generator=g)
    source = Directions.from_sets(DirectionSet(vectors, [-1], "mean_diff"))
    flat = Kernel(1.0, 1.0, 1.0, math.inf)
    plan = build_plan(lm, EditSpec(k=2, attn=flat, norm_preserving=not args.plain), source)
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        apply_plan(lm, plan, mode="weights")
        edited = lm.model(input_ids=ids).logits
    names = [e.writer.name for e in plan.edits]
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=names, use_dora=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_model("mistral"), config)
    weights = dict(lm.model.named_parameters())
    with torch.no_grad():
        for e in plan.edits:
            module = model.base_model.model.get_submodule(e.writer.name)
            w, u = module.base_layer.weight.double(), e.basis.double()
            module.lora_A["default"].weight.copy_(u @ w)
            module.lora_B["default"].weight.copy_(-e.scale * u.T)
            module.lora_magnitude_vector["default"].weight.copy_(
                weights[f"{e.writer.name}.weight"].double().norm(dim=1)
            )
        dora = model(input_ids=ids).logits
    print(f"max |logit(edit) - logit(base)|: {(edited - base).abs().max().item():.4g}")
    print(f"max |logit(best DoRA) - logit(edit)|: {(dora - edited).abs().max().item():.4g}")


if __name__ == "__main__":
    main()
