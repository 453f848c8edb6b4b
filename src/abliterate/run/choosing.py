"""The "choose" stage of ``run``: which edit to make, from the sweep alone or from the search.

* ``--no-search``: the sweep's chosen direction removed from every writer and the embeddings at ``scale``
  (the classic abliteration, as an :class:`~abliterate.edit.spec.EditSpec`).
* default: the search (:mod:`abliterate.select.search`) over the edit space, warm-started with the sweep's best
  candidates, each trial applied in place and reverted (:func:`abliterate.edit.plan.applied`) and scored by one
  :class:`~abliterate.select.scorer.Scorer`; the front is checked by generation on the held-out check prompts
  (:class:`~abliterate.select.check.FrontCheck`) with the run's judge, as the final evaluation judges.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from abliterate.edit.plan import Directions, applied
from abliterate.edit.spec import EditSpec, Kernel
from abliterate.errors import AbliterateError
from abliterate.lm.fingerprint import revision_of, weights_digest
from abliterate.lm.model import LoadedModel
from abliterate.measure.capture import Activations
from abliterate.measure.directions import DirectionSet, compute
from abliterate.run.config import RunConfig
from abliterate.run.context import RunContext, judge_for
from abliterate.select.check import FrontCheck, check_key
from abliterate.select.scorer import Scorer
from abliterate.select.search import Pick, SearchResult, SearchSettings, SearchSpace, Verify, full_params, search
from abliterate.select.sweep import Method, Selection

StageProgress = Callable[[str, int, int], None]
DEFAULT_TRIALS = SearchSettings.trials  # when neither --trials nor --timeout is given (the library's)


@dataclass
class Choice:
    """The edit ``run`` makes, where it came from, and the directions that build it."""

    spec: EditSpec
    source: Directions
    search: SearchResult | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "note": self.note, "searched": self.search is not None}

    def label(self) -> str:
        """One line: the direction, and the search trial it came from."""
        s, index = self.spec, self.spec.direction_index
        where = "own layers" if index is None else f"layer {int(index) if index == int(index) else round(index, 2)}"
        trial = f" (trial {self.search.chosen.number})" if self.search and self.search.chosen else ""
        return f"{s.method} {where} pos {s.position}" + (f" k={s.k}" if s.k > 1 else "") + trial


def method_of(label: str, methods: Sequence[Method]) -> Method:
    """The :class:`Method` a sweep label (``"slerp(t=0.5)"``) stands for."""
    for m in methods:
        if m.label == label:
            return m
    raise AbliterateError(f"unknown method label {label!r}")


def sweep_spec(sel: Selection, methods: Sequence[Method], scale: float, norm_preserving: bool) -> EditSpec:
    """The sweep's chosen candidate as the classic edit: every writer and the embeddings at ``scale``."""
    if sel.chosen is None:
        raise AbliterateError(sel.note)
    m = method_of(sel.chosen.method, methods)
    flat = Kernel(peak=0.0, max_weight=scale, edge_weight=scale, width=math.inf)
    return EditSpec(
        method=m.name,
        slerp_t=float(m.kwargs.get("t", 1.0)),
        position=sel.chosen.position,
        direction_index=float(sel.chosen.layer),
        attn=flat,
        mlp=flat,
        embedding=scale,
        norm_preserving=norm_preserving,
    )


def journal_path(out: str | Path) -> Path:
    """The search journal lives beside the output until the run succeeds (then it moves inside)."""
    out = Path(out)
    return out.parent / f"{out.name}.search.log"


def space_of(cfg: RunConfig, positions: Sequence[int | str]) -> SearchSpace:
    sc = cfg.search
    return SearchSpace(
        methods=tuple(sc.methods),
        positions=tuple(positions),
        direction_range=(sc.direction_range[0], sc.direction_range[1]),
        per_layer=sc.per_layer,
        max_k=sc.max_k,
        peak_range=(sc.peak_range[0], sc.peak_range[1]),
        weight_range=(sc.weight_range[0], sc.weight_range[1]),
        embedding=sc.embedding,
        norm_preserving=tuple(dict.fromkeys(sc.norm_preserving)),
    )


def _digest(items: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(items).encode()).hexdigest()[:16]


def choose_edit(
    ctx: RunContext,
    lm: LoadedModel,
    acts: Activations,
    sel: Selection,
    scorer: Scorer,
    progress: StageProgress | None = None,
    pick: Pick | None = None,
) -> Choice:
    """The edit to make: the sweep's (``cfg.search.enabled`` false) or the search's pick, scored by ``scorer``
    (the validation prompts, built on the unedited model); the front is checked on the held-out check prompts with
    the run's judge (:func:`front_check`)."""
    cfg, source = ctx.cfg, Directions(acts)
    if not cfg.search.enabled:
        spec = sweep_spec(sel, ctx.methods, cfg.scale, cfg.norm_preserving)
        return Choice(spec, source, None, f"the sweep's {sel.chosen.method} direction at full strength")
    sc = cfg.search
    space = space_of(cfg, acts.positions)
    mode = "hooks" if lm.offloaded or lm.quantized else "weights"  # weights can only be edited in memory
    if mode == "hooks" and any(w.weight.dim() == 3 for w in lm.anatomy.all_writers()):
        space = replace(space, norm_preserving=(False,))  # fused experts have no runtime norm-preserving twin

    def objective(spec: EditSpec) -> dict[str, float]:
        with applied(lm, spec, source, mode=mode):
            return scorer.score().to_dict()

    verify, where = front_check(ctx, lm, scorer, lambda spec: applied(lm, spec, source, mode=mode))

    settings = SearchSettings(
        space=space,
        trials=sc.trials if sc.trials is not None else (None if sc.timeout else DEFAULT_TRIALS),
        timeout=sc.timeout,
        seed=sc.seed,
        journal=journal_path(cfg.out),
        resume=sc.resume,
        identity=search_identity(ctx, lm, acts, scorer),
        startup=sc.startup,
        verify_top=sc.verify_top,
        kl_budget=sc.kl_budget,
        trial=sc.trial,
        allow_over_budget=sc.allow_over_budget,
    )
    warm = warm_start(sel, ctx.methods, space, lm.num_layers, sc.warm_start)
    result = search(
        objective,
        num_layers=lm.num_layers,
        settings=settings,
        warm_start=warm,
        verify=verify,
        base=scorer.base.to_dict(),
        progress=progress,
        pick=pick,
    )
    assert result.chosen is not None
    result.note += where
    return Choice(result.chosen.edit(), source, result, result.note)


def front_check(
    ctx: RunContext, lm: LoadedModel, scorer: Scorer, edited: Callable[[EditSpec], AbstractContextManager[Any]]
) -> tuple[Verify | None, str]:
    """The search's front check (None with ``verify_top`` 0) and a note when it is not held out: the run's judge
    (``ctx.judge``, else the config's) on the check prompts, built on the unedited model when first needed (a
    resume whose checks are all in the journal builds nothing); ``edited(spec)`` applies a trial's edit."""
    cfg, sc = ctx.cfg, ctx.cfg.search
    if not sc.verify_top:
        return None, ""
    harmful, harmless, where = ctx.harmful.check, ctx.harmless.check, ""
    if not harmful or not harmless:  # e.g. a profile whose train split is all its prompts
        harmful, harmless = ctx.harmful.val, ctx.harmless.val
        where = (
            "; the front was checked on the validation prompts (in-sample): no prompts are left over from the "
            "train split for a held-out check (lower --n-train or add prompts)"
        )
    elif min(len(ctx.harmful.check), len(ctx.harmless.check)) < sc.check_prompts:
        where = f"; the front was checked on {len(harmful)} + {len(harmless)} held-out prompts (fewer were left)"
    judge = ctx.judge or judge_for(cfg, ctx.profile)
    settings = {"system": cfg.system, "max_new_tokens": sc.verify_tokens, "kl_tokens": cfg.kl_tokens}
    settings |= {"batch_size": cfg.batch_size, "refusal_ids": scorer.refusal_ids}
    built: list[FrontCheck] = []

    def measure(spec: EditSpec) -> dict[str, Any]:
        if not built:  # before the edit below: the check's reference is the unedited model's
            built.append(FrontCheck(lm, harmful, harmless, judge, **settings))
        with edited(spec):
            return built[0].measure()

    key = check_key(harmful, harmless, judge, **settings)
    return Verify(measure, key, sc.answer_kl_budget, sc.degenerate_allowance), where


def warm_start(
    sel: Selection, methods: Sequence[Method], space: SearchSpace, num_layers: int, count: int
) -> list[dict[str, Any]]:
    """The sweep's best ``count`` candidates (passing ones, else any scored) as full-strength search parameters."""
    ranked = sorted((c for c in sel.candidates if c.passed), key=lambda c: c.bypass) or sorted(
        (c for c in sel.candidates if c.bypass == c.bypass), key=lambda c: c.bypass
    )
    warm = []
    for c in ranked[:count]:
        m = method_of(c.method, methods)
        if m.name in space.methods:
            warm.append(full_params(space, num_layers, c.layer, m.name, c.position))
    return warm


# [search] keys that only decide how long to search, which trials to check or which one to take: a resume may
# change them. Every other key is part of the journal's identity (a new key is, unless listed here).
RESUMABLE_KEYS = frozenset(
    {"enabled", "trials", "timeout", "kl_budget", "trial", "resume", "pick_wait", "warm_start", "verify_top"}
    | {"allow_over_budget", "answer_kl_budget", "degenerate_allowance"}  # policy only: no number depends on them
)
PROFILE_NOTES = frozenset({"path", "description", "defaults"})  # profile keys no score depends on (defaults: in cfg)


def search_identity(ctx: RunContext, lm: LoadedModel, acts: Activations, scorer: Scorer) -> dict[str, Any]:
    """What a search journal must have been written for to be resumed by this run: everything that changes a
    trial's scores or a front check's verdict (the model's weights, revision, dtype and placement, the prompts
    and their template, the openers, the judge and its markers, the search settings); a resume that differs in
    one is refused naming it, so no score or verdict in the journal is reused across a change."""
    cfg, judge, profile = ctx.cfg, ctx.judge or ctx.profile.marker_judge(), asdict(ctx.profile)
    search = {f"search.{k}": v for k, v in cfg.search.to_dict().items() if k not in RESUMABLE_KEYS}
    mode = "hooks" if lm.offloaded or lm.quantized else "weights"
    return {
        "model": lm.source,
        "revision": revision_of(lm),
        "weights": weights_digest(lm),
        "dtype": str(lm.dtype),
        "placement": f"{mode} (quantize={cfg.quantize}, device_map={cfg.device_map})",
        "chat_template": _digest([str(getattr(lm.tokenizer, "chat_template", None))]),
        "capture": acts.prompt_hash,
        "validation": _digest([*scorer.harmful, "\x01", *scorer.harmless]),
        "system": cfg.system,
        "template": repr(sorted(lm.template_kwargs.items())) + repr(lm.response_prefix),
        "openers": _digest([*ctx.profile.openers, "\x01", *map(str, scorer.refusal_ids)]),
        "judge": f"{type(judge).__name__} {cfg.judge} {cfg.judge_labels or ''}".strip(),
        "markers": _digest([str(m) for m in getattr(judge, "markers", ())]),
        "window": getattr(judge, "window", None),
        "behaviour_profile": _digest([repr(sorted((k, v) for k, v in profile.items() if k not in PROFILE_NOTES))]),
        **search,  # verify_tokens, seed, the space's ranges, ... (a new key too)
    }


def with_projection(ds: DirectionSet, acts: Activations, position: int | str, sel: Selection) -> DirectionSet:
    """``ds`` annotated with the sweep's pick and each point's harmful mean projection onto the unit direction
    at ``position`` (the default induction coefficient)."""
    p = acts.position_index(position)
    units = ds.vectors[:, ds.positions.index(position)].float()
    units = units / units.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ds.meta["harmful_projection"] = [float(x) for x in (acts.harmful_mean[:, p].float() * units).sum(-1)]
    if sel.chosen:
        ds.meta["chosen"] = {"layer": sel.chosen.layer, "position": sel.chosen.position, "method": sel.chosen.method}
    return ds


def edit_directions(acts: Activations, spec: EditSpec, sel: Selection) -> DirectionSet:
    """The direction set of the edit's method (every residual point, every position), annotated with the edit:
    with ``edit.json`` it rebuilds the same edit elsewhere (``abliterate apply --edit``)."""
    ds = compute(acts, spec.method, **({"t": spec.slerp_t} if spec.method == "slerp" else {}))
    ds.meta["edit"] = spec.to_dict()
    return with_projection(ds, acts, spec.position, sel)
