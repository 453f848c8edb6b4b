"""The whole journey as one library call: load, capture, select, evaluate, edit, evaluate, save.

The library never prints: ``progress(stage, done, total)`` reports what is happening, and the
result object carries every number. Outputs go to a temporary directory renamed into place.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .adapter import restrict_run, write_run_adapter
from .capture import Activations, capture
from .choosing import Choice, choose_edit, edit_directions, journal_path, with_projection
from .config import RunConfig
from .directions import DirectionSet
from .errors import AbliterateError
from .evaluation import Evaluator, Metrics, baseline_note
from .judge import Judge
from .loading import load_model
from .manifest import write_run_manifest
from .model import LoadedModel
from .plan import applied, apply_plan, build_plan
from .profiles import Profile, ProfileError, load_profile, profile_splits
from .prompts import PromptSplits
from .saving import atomic_directory, check_output
from .scorer import Scorer
from .scoring import refusal_token_ids
from .search import Pick
from .selection import Method, Selection, select

StageProgress = Callable[[str, int, int], None]


class NoRefusalError(AbliterateError):
    """The model does not refuse the harmful prompts: there is nothing to abliterate."""


@dataclass
class RunResult:
    out: Path | None
    selection: Selection
    before: Metrics
    after: Metrics
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)  # the model's ForwardCapabilities
    choice: Choice | None = None  # the edit made: the sweep's, or the search's pick (with every trial)
    behaviour: dict[str, Any] = field(default_factory=dict)  # the profile: name, goal, judge, scored token ids
    induction: dict[str, Any] | None = None  # goal induce: the baked induction (edit.json)

    def metrics(self) -> dict[str, Any]:
        chosen = self.selection.chosen
        return {
            "abliterate_version": __version__,
            "model": self.config.get("model"),
            "chosen": None
            if chosen is None
            else {"layer": chosen.layer, "position": chosen.position, "method": chosen.method},
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "selection": self.selection.to_dict(),
            "timings_s": self.timings,
            "model_capabilities": self.capabilities,
            "edit": None if self.choice is None else self.choice.to_dict(),
            "search": None if self.choice is None or self.choice.search is None else self.choice.search.to_dict(),
            "behaviour": self.behaviour,
            "induction": self.induction,
            "note": self.note,
        }


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "abliterate": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _methods(cfg: RunConfig) -> list[Method]:
    return [Method(m, {"t": cfg.slerp_t} if m == "slerp" else {}) for m in cfg.methods]


def load_for(cfg: RunConfig, *, residual_only: bool = False) -> LoadedModel:
    lm = load_model(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        device_map=cfg.device_map,
        max_memory=cfg.max_memory,
        offload_folder=cfg.offload_folder,
        quantize=cfg.quantize,
        trust_remote_code=cfg.trust_remote_code,
        chat_template=cfg.chat_template,
        residual_only=residual_only,
    )
    if cfg.disable_thinking:
        lm.template_kwargs["enable_thinking"] = False
    lm.response_prefix = cfg.response_prefix
    return lm


def judge_for(cfg: RunConfig, profile: Profile | None = None) -> Judge:
    """The final-evaluation judge: ``cfg.judge`` when it is not the default ``marker``, else the behaviour
    profile's judge (its markers; a judge model loaded on ``cfg.device``)."""
    from .judges import judge_from_spec

    profile = profile or load_profile(cfg.behaviour)
    spec = cfg.judge if cfg.judge != "marker" else profile.judge
    if spec == "marker":
        return profile.marker_judge()
    settings = profile.judge_settings()
    labels = cfg.judge_labels or settings.pop("labels", None)
    settings.pop("labels", None)
    load = {"device": cfg.device, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    return judge_from_spec(spec, labels=labels, batch_size=cfg.batch_size, **settings, **load)


def splits_for(cfg: RunConfig, profile: Profile | None = None) -> tuple[PromptSplits, PromptSplits]:
    """(behaviour side, plain side) prompts: for refusal the harmful and harmless sets."""
    return profile_splits(
        profile or load_profile(cfg.behaviour),
        harmful=cfg.harmful,
        harmless=cfg.harmless,
        n_train=cfg.n_train,
        n_val=cfg.n_val,
        n_test=cfg.n_test,
        seed=cfg.seed,
        prefix=cfg.prompt_prefix,
        suffix=cfg.prompt_suffix,
    )


def scorer_for(
    cfg: RunConfig, lm: LoadedModel, profile: Profile, harmful: PromptSplits, harmless: PromptSplits, **kw: Any
) -> Scorer:
    """The validation scorer, counting the first tokens of the profile's answer openers."""
    ids = refusal_token_ids(lm.tokenizer, profile.openers)
    return Scorer(lm, harmful.val, harmless.val, system=cfg.system, batch_size=cfg.batch_size, refusal_ids=ids, **kw)


def measure(
    cfg: RunConfig, lm: LoadedModel, progress: StageProgress | None = None, scorer: Scorer | None = None
) -> tuple[Activations, Selection]:
    """Capture on the train split and sweep candidates on the validation split (scored by ``scorer``, built
    on the unedited model and the validation split, when given: the search then reuses it)."""
    profile = load_profile(cfg.behaviour)
    harmful, harmless = splits_for(cfg, profile)
    if scorer is None:
        scorer = scorer_for(cfg, lm, profile, harmful, harmless)
    if progress:
        progress("capture", 0, len(harmful.train) + len(harmless.train))
    acts = capture(
        lm,
        harmful.train,
        harmless.train,
        positions=cfg.positions,
        batch_size=cfg.batch_size,
        system=cfg.system,
        progress=(lambda d, t: progress("capture", d, t)) if progress else None,
    )
    sel = select(
        lm,
        acts,
        harmful.val,
        harmless.val,
        methods=_methods(cfg),
        layers=cfg.layers,
        skip_last=cfg.skip_last,
        kl_threshold=cfg.kl_threshold,
        min_induce=cfg.min_induce,
        min_bypass_drop=cfg.min_bypass_drop,
        batch_size=cfg.batch_size,
        progress=(lambda d, t, _s: progress("sweep", d, t)) if progress else None,
        scorer=scorer,
        prefer="induce" if profile.goal == "induce" else "bypass",
    )
    return acts, sel


def run(cfg: RunConfig, progress: StageProgress | None = None, pick: Pick | None = None) -> RunResult:
    """``abliterate run``: writes the edited model, directions, metrics, config and report to ``cfg.out``.
    ``pick``: asked for the search's trial after its default policy chose (see :func:`abliterate.search.search`)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    target = check_output(cfg.out, overwrite=cfg.force, inputs=(Path(cfg.model) if Path(cfg.model).exists() else None,))
    profile = load_profile(cfg.behaviour)
    lm = load_for(cfg)
    timings["load"] = time.perf_counter() - t0
    why = "quantized" if lm.quantized else "offloaded by device_map" if lm.offloaded else ""
    if profile.goal == "induce" and (why or cfg.as_adapter):
        raise ProfileError(
            f"behaviour '{profile.name}' induces: the induction is baked into the embeddings, which "
            + ("no LoRA adapter holds; drop --as-adapter" if cfg.as_adapter else f"a {why} model cannot hold; load it")
        )
    if cfg.as_adapter:  # refuse what no adapter holds before the long part; keep the search to edits one can
        restrict_run(cfg, lm)
    checkpoint = checkpoint_dir(lm, why) if why else None  # fail before the long part, not after it
    judge = judge_for(cfg, profile)
    harmful, harmless = splits_for(cfg, profile)
    t = time.perf_counter()
    base_progress = (lambda d, t: progress("validation base", d, t)) if progress else None
    scorer = scorer_for(cfg, lm, profile, harmful, harmless, progress=base_progress)
    scorer.progress = None  # the base pass is reported; the sweep and search report their own steps
    acts, sel = measure(cfg, lm, progress, scorer)
    timings["capture_and_sweep"] = time.perf_counter() - t
    if not sel.baseline_refuses:
        raise NoRefusalError(sel.note if profile.name == "refusal" else no_behaviour(profile, sel))
    if sel.chosen is None and (not cfg.search.enabled or profile.goal == "induce"):
        raise AbliterateError(sel.note)
    t = time.perf_counter()
    choice = None
    if profile.goal == "remove":
        choice = choose_edit(cfg, lm, acts, sel, _methods(cfg), scorer, progress, pick, profile.marker_judge())
        timings["search" if choice.search else "choose"] = time.perf_counter() - t
    compare = [] if judge.name == "marker" else [profile.marker_judge()]
    others = {} if profile.name == "refusal" else {"compare": compare}  # refusal: the evaluator's own default
    evaluator = Evaluator(
        lm,
        harmful.test,
        harmless.test,
        judge=judge,
        system=cfg.system,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        kl_tokens=cfg.kl_tokens,
        batch_size=cfg.batch_size,
        **others,
    )

    def evaluate(name: str, edit: Any = None) -> Metrics:
        start = time.perf_counter()
        if progress:
            progress(f"evaluate {name}", 0, 1)
        metrics = evaluator.measure(name, edit)
        metrics.behaviour = profile.name
        if progress:
            progress(f"evaluate {name}", 1, 1)
        timings[f"evaluate_{name}"] = time.perf_counter() - start
        return metrics

    before = evaluate("before")
    notes = [baseline_note(before) if profile.name == "refusal" else ""]
    induction = None
    if choice is None:  # goal induce: the sweep's direction pinned to the behaviour side's mean projection
        from .induction import bake_chosen

        induction = bake_chosen(lm, sel, acts)
        edit = None
        after = evaluate("after")
        notes.append(f"induced {profile.name}: {induction['note']}")
    elif checkpoint is None:
        edit = apply_plan(lm, build_plan(lm, choice.spec, choice.source), mode="weights")  # reverted by as_adapter only
        after = evaluate("after")
    else:  # offloaded or quantized: measure the runtime twin, write the edit from the checkpoint
        after = evaluate("after", lambda: applied(lm, choice.spec, choice.source, mode="hooks"))
        notes.append(
            f"the model was {why}, so 'after' was measured with runtime ablation hooks (which equal the weight "
            f"edit) and the weights were edited shard by shard from {checkpoint}"
        )
    ids = refusal_token_ids(lm.tokenizer, profile.openers)
    result = RunResult(
        None, sel, before, after, timings, cfg.to_dict(), "; ".join(n for n in notes if n), lm.caps.to_dict(), choice
    )
    result.behaviour, result.induction = {**profile.to_dict(), "score_token_ids": ids}, induction
    t = time.perf_counter()
    if progress:
        progress("save", 0, 1)
    with atomic_directory(target) as tmp:
        if cfg.as_adapter:  # the adapter (read off the original weights) instead of the edited model
            result.note = "; ".join([result.note, *write_run_adapter(tmp, lm, edit)]).strip("; ")
        elif checkpoint is None:
            lm.model.save_pretrained(tmp)
        else:
            _stream_into(tmp, checkpoint, choice, cfg, progress)
        lm.tokenizer.save_pretrained(tmp)
        directions = (
            annotate(sel, acts, sel.chosen.method) if choice is None else edit_directions(acts, choice.spec, sel)
        )
        if profile.name != "refusal":
            directions.meta["behaviour"] = profile.name
        directions.save(tmp / "directions.safetensors")
        (tmp / "edit.json").write_text(json.dumps(induction or choice.to_dict(), indent=2) + "\n")
        journal = journal_path(cfg.out)
        if choice is not None and choice.search is not None and journal.exists():
            os.replace(journal, tmp / "search_journal.log")  # the run succeeded: the journal goes inside
        write_artifacts(tmp, result, acts)
        timings["save"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        (tmp / "metrics.json").write_text(json.dumps(result.metrics(), indent=2) + "\n")
        write_run_manifest(tmp, cfg, versions())  # last: it hashes every file written
        if progress:  # before the rename, so that nothing runs between the rename and the return
            progress("save", 1, 1)
    result.out = target
    return result


def no_behaviour(profile: Profile, sel: Selection) -> str:
    return (
        f"the model does not show '{profile.name}' on its behaviour prompts at baseline (mean log-odds of the "
        f"profile's openers {sel.base_bypass:.2f}); there is nothing to find: check the profile's prompts and openers"
    )


def checkpoint_dir(lm: LoadedModel, why: str) -> Path:
    """The local safetensors checkpoint a model was loaded from (a hub id resolves to its cache snapshot)."""
    from .shards import INDEX, SINGLE

    folder = lm.local_path
    if folder is None:
        from transformers.utils import cached_file

        config = cached_file(lm.source, "config.json", _raise_exceptions_for_missing_entries=False)
        folder = Path(config).parent if config else None
    if folder is None or not folder.is_dir() or not ((folder / INDEX).is_file() or (folder / SINGLE).is_file()):
        raise AbliterateError(
            f"{lm.source} is {why}, so its weights can only be edited from a safetensors checkpoint on disk, "
            "and none was found; load it without device_map offload or quantize"
        )
    return folder


def _stream_into(tmp: Path, checkpoint: Path, choice: Choice, cfg: RunConfig, progress: StageProgress | None) -> None:
    """Write the edited checkpoint into ``tmp`` with the streaming edit (through a sub-folder moved up)."""
    from .streaming import stream_edit

    staging = tmp / ".model"
    stream_edit(
        checkpoint,
        staging,
        choice.spec,
        choice.source,
        trust_remote_code=cfg.trust_remote_code,
        progress=(lambda d, t: progress("save model", d, t)) if progress else None,
    )
    for item in staging.iterdir():
        os.replace(item, tmp / item.name)
    staging.rmdir()


def write_measurement(target: Path, cfg: RunConfig, acts: Activations, sel: Selection) -> Path:
    """``abliterate measure``'s outputs, written atomically to ``target``: the direction set (with the chosen
    candidate), candidates.json, the effective config + versions and report.html with its PNG plots."""
    from .report import write_measure_report

    with atomic_directory(target) as tmp:
        label = sel.chosen.method if sel.chosen else next(iter(sel.direction_sets))
        directions, name = annotate(sel, acts, label), load_profile(cfg.behaviour).name
        if name != "refusal":
            directions.meta["behaviour"] = name
        directions.save(tmp / "directions.safetensors")
        (tmp / "candidates.json").write_text(json.dumps(sel.to_dict(), indent=2) + "\n")
        (tmp / "abliterate_config.json").write_text(
            json.dumps({"config": cfg.to_dict(), "versions": versions()}, indent=2) + "\n"
        )
        write_measure_report(tmp, sel, acts, cfg.to_dict())
        write_run_manifest(tmp, cfg, versions(), command="measure")
    return target


def annotate(sel: Selection, acts: Activations, label: str) -> DirectionSet:
    """The direction set of method ``label`` with the chosen candidate and, per layer, the harmful
    prompts' mean projection onto the unit direction (the default induction coefficient)."""
    position = sel.chosen.position if sel.chosen else acts.positions[-1]
    return with_projection(sel.direction_sets[label], acts, position, sel)


def write_artifacts(folder: Path, result: RunResult, acts: Activations) -> None:
    """Effective config + versions, model card and HTML report."""
    from .card import model_card
    from .report import write_report

    (folder / "abliterate_config.json").write_text(
        json.dumps({"config": result.config, "versions": versions()}, indent=2) + "\n"
    )
    (folder / "README.md").write_text(model_card(result))
    write_report(folder, result, acts)
