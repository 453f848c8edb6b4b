"""The whole journey as one library call: load, capture, select, evaluate, edit, evaluate, save.

The library never prints: ``progress(stage, done, total)`` reports what is happening, and the
result object carries every number. Outputs go to a temporary directory renamed into place.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from abliterate.behaviours.profiles import Profile, ProfileError, load_profile
from abliterate.edit.plan import AppliedEdit, applied, apply_plan, build_plan
from abliterate.errors import AbliterateError
from abliterate.evaluate.evaluation import Evaluator, Metrics, baseline_note
from abliterate.lm.demo import cache_dir
from abliterate.lm.loading import load_model
from abliterate.lm.model import LoadedModel
from abliterate.lm.saving import atomic_directory, check_output
from abliterate.measure.capture import Activations, capture
from abliterate.measure.directions import DirectionSet
from abliterate.measure.first_token import refusal_token_ids
from abliterate.outputs.adapter import adapter_search_limits, write_run_adapter
from abliterate.outputs.card import KnownModel
from abliterate.outputs.gguf_out import check_gguf_type, gguf_source, write_run_gguf
from abliterate.run.choosing import Choice, choose_edit, edit_directions, journal_path, with_projection
from abliterate.run.config import RunConfig
from abliterate.run.context import RunContext, resolve
from abliterate.run.result import RunResult
from abliterate.run.run_manifest import write_run_manifest
from abliterate.run.timing import StageTimer
from abliterate.select.scorer import Scorer
from abliterate.select.search import Pick
from abliterate.select.sweep import Selection, select
from abliterate.version import __version__

StageProgress = Callable[[str, int, int], None]


class NoRefusalError(AbliterateError):
    """The model does not refuse the harmful prompts: there is nothing to abliterate."""


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "abliterate": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def load_for(cfg: RunConfig, *, residual_only: bool = False) -> LoadedModel:
    lm = load_model(cfg.model, **cfg.load_kwargs(), residual_only=residual_only)
    return lm.with_prompt_format(cfg.disable_thinking, cfg.response_prefix)


def scorer_for(ctx: RunContext, lm: LoadedModel, **kw: Any) -> Scorer:
    """The validation scorer, counting the first tokens of the profile's answer openers."""
    ids = refusal_token_ids(lm.tokenizer, ctx.profile.openers)
    cfg = ctx.cfg
    return Scorer(
        lm, ctx.harmful.val, ctx.harmless.val, system=cfg.system, batch_size=cfg.batch_size, refusal_ids=ids, **kw
    )


def measure(
    ctx: RunContext,
    lm: LoadedModel,
    progress: StageProgress | None = None,
    scorer: Scorer | None = None,
    timer: StageTimer | None = None,
) -> tuple[Activations, Selection]:
    """Capture on the train split and sweep candidates on the validation split (scored by ``scorer``, built
    on the unedited model and the validation split, when given: the search then reuses it); ``timer`` times the
    two stages ("capture", "sweep")."""
    harmful, harmless = ctx.harmful, ctx.harmless
    timer = timer or StageTimer()
    with timer.stage("capture"):
        acts = _capture(ctx, lm, progress)
    with timer.stage("sweep"):
        if scorer is None:
            scorer = scorer_for(ctx, lm)
        sweep_progress = (lambda d, t, _s: progress("sweep", d, t)) if progress else None
        sel = select(lm, acts, harmful.val, harmless.val, ctx.sweep_settings(), progress=sweep_progress, scorer=scorer)
    return acts, sel


def _capture(ctx: RunContext, lm: LoadedModel, progress: StageProgress | None) -> Activations:
    cfg, harmful, harmless = ctx.cfg, ctx.harmful, ctx.harmless
    if progress:
        progress("capture", 0, len(harmful.train) + len(harmless.train))
    return capture(
        lm,
        harmful.train,
        harmless.train,
        positions=cfg.positions,
        batch_size=cfg.batch_size,
        system=cfg.system,
        progress=(lambda d, t: progress("capture", d, t)) if progress else None,
    )


@dataclass(frozen=True)
class Loaded:
    """The model of a run, and where its edit is written from: in memory, or (``why``: quantized or offloaded)
    shard by shard from the ``checkpoint`` it was loaded from."""

    lm: LoadedModel
    why: str = ""
    checkpoint: Path | None = None


@dataclass
class Evaluated:
    """The evaluation stage's outcome: before and after, the edit applied in memory, the induction baked."""

    before: Metrics
    after: Metrics
    edit: AppliedEdit | None
    induction: dict[str, Any] | None
    notes: list[str]


def run(cfg: RunConfig, progress: StageProgress | None = None, pick: Pick | None = None) -> RunResult:
    """``abliterate run``: writes the edited model, directions, metrics, config and report to ``cfg.out``.
    ``pick``: asked for the search's trial after its default policy chose (see
    :func:`abliterate.select.search.search`)."""
    timer = StageTimer()  # every stage's seconds: metrics.json's "timings_s"
    progress = timer.watch(progress)
    with timer.stage("load"):
        inputs = (Path(cfg.model) if Path(cfg.model).exists() else None,)
        target = check_output(cfg.out, overwrite=cfg.force, inputs=inputs)
        check_gguf_type(cfg.gguf_type)
        profile = load_profile(cfg.behaviour)  # the run's one profile load: everything below reads the context
        cfg, loaded = load_checked(cfg, profile)
    ctx = resolve(cfg, profile, judge=True)
    with timer.stage("validation base"):
        scorer = scorer_for(ctx, loaded.lm, progress=lambda d, t: progress("validation base", d, t))
        scorer.progress = None  # the base pass is reported; the sweep and search report their own steps
    acts, sel = measure(ctx, loaded.lm, progress, scorer, timer)
    check_found(ctx, sel)
    choice = None
    if profile.goal == "remove":
        with timer.stage("search" if cfg.search.enabled else "choose", splits={"check front": "check"}):
            choice = choose_edit(ctx, loaded.lm, acts, sel, scorer, progress, pick)
    done = evaluate(ctx, loaded, sel, acts, choice, timer, progress)
    lm = loaded.lm
    ids = refusal_token_ids(lm.tokenizer, profile.openers)
    note = "; ".join(n for n in done.notes if n)
    timings = timer.seconds
    result = RunResult(None, sel, done.before, done.after, timings, cfg.to_dict(), note, lm.caps.to_dict(), choice)
    result.behaviour, result.induction = {**profile.to_dict(), "score_token_ids": ids}, done.induction
    with timer.stage("save"):
        save(target, ctx, loaded, result, acts, done.edit, timer, progress)
    timings["total"] = timer.total()
    result.out = target
    return result


def load_checked(cfg: RunConfig, profile: Profile) -> tuple[RunConfig, Loaded]:
    """Load the model and refuse, before the long part, what its edit could not be written to; returns the config
    the run goes on with (see :func:`restrict_run`) and the loaded model."""
    lm = load_for(cfg)
    why = "quantized" if lm.quantized else "offloaded by device_map" if lm.offloaded else ""
    adapter = "--as-adapter" if cfg.as_adapter else "--adapter" if cfg.adapter else ""
    if profile.goal == "induce" and (why or adapter):
        raise ProfileError(
            f"behaviour '{profile.name}' induces: the induction is baked into the embeddings, which "
            + (f"no LoRA adapter holds; drop {adapter}" if adapter else f"a {why} model cannot hold; load it")
        )
    if cfg.as_adapter or cfg.adapter:  # refuse what no adapter holds before the long part; search what one can
        cfg = restrict_run(cfg, lm)
    checkpoint = checkpoint_dir(lm, why) if why else None  # fail before the long part, not after it
    return cfg, Loaded(lm, why, checkpoint)


def restrict_run(cfg: RunConfig, lm: LoadedModel) -> RunConfig:
    """``run --as-adapter`` or ``--adapter``: a copy of ``cfg`` whose search keeps to edits an adapter holds (no norm
    preservation; no embedding edit where writer biases need PEFT's lora_bias); refuses what no adapter of ``lm``
    holds."""
    flag = "--as-adapter" if cfg.as_adapter else "--adapter"
    limits = {"norm_preserving": cfg.norm_preserving, "search": cfg.search.enabled, "weights": not cfg.as_adapter}
    embeddings = adapter_search_limits(lm, flag=flag, **limits)
    search = replace(cfg.search, norm_preserving=[False], embedding=cfg.search.embedding if embeddings else False)
    return replace(cfg, search=search)


def check_found(ctx: RunContext, sel: Selection) -> None:
    """Stop when the model does not show the behaviour, or when nothing can be chosen."""
    if not sel.baseline_refuses:
        raise NoRefusalError(sel.note if ctx.is_refusal else no_behaviour(ctx.profile, sel))
    if sel.chosen is None and (not ctx.cfg.search.enabled or ctx.profile.goal == "induce"):
        raise AbliterateError(sel.note)


def evaluate(
    ctx: RunContext,
    loaded: Loaded,
    sel: Selection,
    acts: Activations,
    choice: Choice | None,
    timer: StageTimer,
    progress: StageProgress | None,
) -> Evaluated:
    """Evaluate the unedited model (read from the cross-run cache when ``cfg.eval_cache`` and a run with the same
    model and settings stored it), make the edit (or bake the induction), evaluate again; progress is reported
    per generation batch."""
    cfg, profile, lm, judge = ctx.cfg, ctx.profile, loaded.lm, ctx.judge
    assert judge is not None, "a run's context is resolved with its judge"
    compare = [] if judge.name == "marker" else [profile.marker_judge()]
    others = {} if ctx.is_refusal else {"compare": compare}  # refusal: the evaluator's own default
    evaluator = Evaluator(
        lm,
        ctx.harmful.test,
        ctx.harmless.test,
        judge=judge,
        system=cfg.system,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        kl_tokens=cfg.kl_tokens,
        batch_size=cfg.batch_size,
        **others,
    )

    def measured(name: str, edit: Any = None) -> Metrics:
        stage = f"evaluate {name}"
        report = (lambda d, t: progress(stage, d, t)) if progress else None
        with timer.stage(f"evaluate_{name}"):
            if name == "before":
                cache = eval_cache_dir() if cfg.eval_cache else None
                metrics = evaluator.measure_base(name, cache=cache, progress=report)
            else:
                metrics = evaluator.measure(name, edit, progress=report)
        metrics.behaviour = profile.name
        return metrics

    before = measured("before")
    notes = [baseline_note(before) if ctx.is_refusal else "", evaluator.cache_note]
    induction, edit = None, None
    if choice is None:  # goal induce: the sweep's direction pinned to the behaviour side's mean projection
        from abliterate.run.induction import bake_chosen

        induction = bake_chosen(lm, sel, acts)
        after = measured("after")
        notes.append(f"induced {profile.name}: {induction['note']}")
    elif loaded.checkpoint is None:
        edit = apply_plan(lm, build_plan(lm, choice.spec, choice.source), mode="weights")  # reverted by as_adapter only
        after = measured("after")
    else:  # offloaded or quantized: measure the runtime twin, write the edit from the checkpoint
        after = measured("after", lambda: applied(lm, choice.spec, choice.source, mode="hooks"))
        notes.append(
            f"the model was {loaded.why}, so 'after' was measured with runtime ablation hooks (which equal the "
            f"weight edit) and the weights were edited shard by shard from {loaded.checkpoint}"
        )
    return Evaluated(before, after, edit, induction, notes)


def save(
    target: Path,
    ctx: RunContext,
    loaded: Loaded,
    result: RunResult,
    acts: Activations,
    edit: AppliedEdit | None,
    timer: StageTimer,
    progress: StageProgress | None,
) -> None:
    """Write everything into a temporary folder renamed to ``target``: the model (or adapter), tokenizer,
    directions, edit.json, the search journal, config, card, report, metrics and, last, the manifest."""
    cfg, lm, choice, sel, timings = ctx.cfg, loaded.lm, result.choice, result.selection, result.timings
    if progress:
        progress("save", 0, 1)
    with atomic_directory(target) as tmp:
        if cfg.as_adapter:  # the adapter (read off the original weights) instead of the edited model
            result.note = "; ".join([result.note, *write_run_adapter(tmp, lm, edit)]).strip("; ")
        elif loaded.checkpoint is None:
            lm.model.save_pretrained(tmp)
        else:
            _stream_into(tmp, loaded.checkpoint, choice, cfg, progress)
        lm.tokenizer.save_pretrained(tmp)
        directions = (
            annotate(sel, acts, sel.chosen.method) if choice is None else edit_directions(acts, choice.spec, sel)
        )
        if not ctx.is_refusal:
            directions.meta["behaviour"] = ctx.profile.name
        directions.save(tmp / "directions.safetensors")
        (tmp / "edit.json").write_text(json.dumps(result.induction or choice.to_dict(), indent=2) + "\n")
        source = gguf_source(cfg.model)
        if cfg.gguf and source is not None and not cfg.as_adapter:
            result.note = "; ".join([result.note, _gguf_into(tmp, source, cfg, lm, edit, choice, progress)]).strip("; ")
        journal = journal_path(cfg.out)
        if choice is not None and choice.search is not None and journal.exists():
            os.replace(journal, tmp / "search_journal.log")  # the run succeeded: the journal goes inside
        write_artifacts(tmp, result, acts)
        timings.update(timer.so_far())  # the save stage up to here (its files; not the metrics and manifest below)
        (tmp / "metrics.json").write_text(json.dumps(result.metrics(), indent=2) + "\n")
        write_run_manifest(tmp, cfg, ctx.profile, versions())  # last: it hashes every file written
        if progress:  # before the rename, so that nothing runs between the rename and the return
            progress("save", 1, 1)


def no_behaviour(profile: Profile, sel: Selection) -> str:
    return (
        f"the model does not show '{profile.name}' on its behaviour prompts at baseline (mean log-odds of the "
        f"profile's openers {sel.base_bypass:.2f}); there is nothing to find: check the profile's prompts and openers"
    )


def checkpoint_dir(lm: LoadedModel, why: str) -> Path:
    """The local safetensors checkpoint a model was loaded from (a hub id resolves to its cache snapshot)."""
    from abliterate.checkpoint.shards import INDEX, SINGLE

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
    from abliterate.checkpoint.stream_edit import stream_edit

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


def _gguf_into(
    tmp: Path,
    source: Path,
    cfg: RunConfig,
    lm: LoadedModel,
    edit: AppliedEdit | None,
    choice: Choice | None,
    progress: Any,
) -> str:
    """The edited model as a GGUF beside the safetensors one (the run's own plan, from the source GGUF); a note."""
    if edit is None or choice is None:
        return "no GGUF written: an induced behaviour is baked into biases a GGUF model does not carry"
    written = write_run_gguf(
        tmp,
        source,
        edit.plan,
        lm.hidden_size,
        gguf_type=cfg.gguf_type,
        edit=choice.to_dict(),
        progress=(lambda d, t: progress("save gguf", d, t)) if progress else None,
    )
    return f"wrote {written.path.name} ({written.bytes / 2**20:.0f} MiB) for llama.cpp/Ollama"


def write_measurement(target: Path, ctx: RunContext, acts: Activations, sel: Selection) -> Path:
    """``abliterate measure``'s outputs, written atomically to ``target``: the direction set (with the chosen
    candidate), candidates.json, the effective config + versions and report.html with its PNG plots."""
    from abliterate.outputs.report import write_measure_report

    cfg = ctx.cfg
    with atomic_directory(target) as tmp:
        label = sel.chosen.method if sel.chosen else next(iter(sel.direction_sets))
        directions, name = annotate(sel, acts, label), ctx.profile.name
        if name != "refusal":
            directions.meta["behaviour"] = name
        directions.save(tmp / "directions.safetensors")
        (tmp / "candidates.json").write_text(json.dumps(sel.to_dict(), indent=2) + "\n")
        (tmp / "abliterate_config.json").write_text(
            json.dumps({"config": cfg.to_dict(), "versions": versions()}, indent=2) + "\n"
        )
        write_measure_report(tmp, sel, acts, cfg.to_dict())
        write_run_manifest(tmp, cfg, ctx.profile, versions(), command="measure")
    return target


def annotate(sel: Selection, acts: Activations, label: str) -> DirectionSet:
    """The direction set of method ``label`` with the chosen candidate and, per layer, the harmful
    prompts' mean projection onto the unit direction (the default induction coefficient)."""
    position = sel.chosen.position if sel.chosen else acts.positions[-1]
    return with_projection(sel.direction_sets[label], acts, position, sel)


def write_artifacts(folder: Path, result: RunResult, acts: Activations) -> None:
    """Effective config + versions, model card and HTML report."""
    from abliterate.outputs.card import model_card
    from abliterate.outputs.report import write_report

    (folder / "abliterate_config.json").write_text(
        json.dumps({"config": result.config, "versions": versions()}, indent=2) + "\n"
    )
    (folder / "README.md").write_text(model_card(result, known_models()))
    write_report(folder, result, acts)


def eval_cache_dir() -> Path:
    """Where the unedited model's evaluations are kept across runs (:mod:`abliterate.evaluate.base_cache`)."""
    return cache_dir() / "evaluations"


def known_models() -> tuple[KnownModel, ...]:
    """Local models whose hub id the model card cannot read off their path: the demo's GGUF."""
    from abliterate.lm.demo import DEMO_HUB_ID, DEMO_LICENSE, DEMO_NAME

    return (KnownModel(cache_dir() / DEMO_NAME, DEMO_HUB_ID, {"license": DEMO_LICENSE}),)
