"""The model card (``README.md``) of a ``run`` output: hub metadata, what was done, before/after, how to rebuild it.

The YAML front matter carries what the Hugging Face hub reads: ``base_model`` (the input model's hub id, when it
is known), ``base_model_relation`` (``finetune`` for edited weights, ``adapter`` for ``--as-adapter``),
``library_name``, ``pipeline_tag``, ``tags`` and the base model's ``license`` when its card is on disk. A local
input model has no hub id unless its path tells it (a hub cache snapshot, the demo model); the card then says that
``base_model`` is omitted and why.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.evaluate.evaluation import Metrics, behaviour_label, format_rate
from abliterate.outputs.report_edit import edit_rows, headline, layer_count, sweep_words, written_edit

if TYPE_CHECKING:
    from abliterate.run.result import RunResult

TAGS = ("abliterate", "abliterated", "abliteration", "uncensored", "refusal-direction")
LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass
class BaseModel:
    """What is known of the input model: its hub id (or None, with ``why``) and its card's license keys."""

    hub_id: str | None
    why: str = ""
    license: dict[str, str] = field(default_factory=dict)


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return "/" in text


def _cached_hub_id(path: Path) -> str | None:
    """``org/name`` of a path inside the hub cache (``.../models--org--name/snapshots/<sha>``)."""
    for part in path.parts:
        if part.startswith("models--"):
            candidate = part.removeprefix("models--").replace("--", "/", 1)
            return candidate if _is_hub_id(candidate) else None
    return None


def _card_license(readme: Path | None) -> dict[str, str]:
    """The license keys of a model card (empty when there is none or it has no front matter)."""
    if readme is None or not readme.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(readme) or {}
    except Exception:  # a malformed card of the input model: no license to copy, the run goes on
        return {}
    return {k: str(meta[k]) for k in LICENSE_KEYS if isinstance(meta.get(k), str | int | float)}


def _cached_card(hub_id: str) -> Path | None:
    """The hub cache's copy of a repo's README.md, if it was ever downloaded (never a network request)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(hub_id, "README.md")
    except Exception:  # an id the cache cannot even look up: no card
        return None
    return Path(found) if isinstance(found, str) else None


@dataclass(frozen=True)
class KnownModel:
    """A local model whose hub id the caller knows though the path does not say it (the demo's GGUF, converted
    from a hub model), with the license its card would carry."""

    path: Path
    hub_id: str
    license: dict[str, str] = field(default_factory=dict)


def base_model_of(source: str, known: Sequence[KnownModel] = ()) -> BaseModel:
    """The hub id and license of the input model ``source`` (a hub id, a local folder or a ``.gguf`` file), from
    what is on disk only; ``known``: local models whose hub id the caller knows."""
    path = Path(source).expanduser()
    if not path.exists():
        if not _is_hub_id(source):
            return BaseModel(None, f"{source} is neither a local path nor a hub id")
        return BaseModel(source, "", _card_license(_cached_card(source)))
    resolved = path.resolve()
    licence = _card_license(resolved / "README.md" if resolved.is_dir() else None)
    cached = _cached_hub_id(resolved)
    if cached:
        return BaseModel(cached, "", licence)
    for model in known:
        if resolved == model.path.resolve():
            return BaseModel(model.hub_id, "", licence or dict(model.license))
    why = f"the input model was the local {'file' if path.is_file() else 'folder'} {path.name}, whose hub id is unknown"
    return BaseModel(None, why, licence)


def front_matter(base: BaseModel, *, adapter: bool) -> str:
    """The YAML header (values JSON-quoted, which YAML reads as plain strings)."""
    lines = ["---"]
    if base.hub_id:
        lines += [
            f"base_model: {json.dumps(base.hub_id)}",
            f"base_model_relation: {'adapter' if adapter else 'finetune'}",
        ]
    lines += [f"{k}: {json.dumps(v)}" for k, v in base.license.items()]
    lines += [f"library_name: {'peft' if adapter else 'transformers'}", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in (*TAGS, *(("peft", "lora") if adapter else ()))]
    return "\n".join([*lines, "---", ""])


def _edit_words(result: RunResult) -> str:
    choice, edit = result.choice, written_edit(result, layer_count(result.selection))
    if edit is None:
        return f"`{json.dumps(choice.spec.to_dict())}`" if choice else "-"
    if not edit.searched:
        return f"the sweep's candidate ({sweep_words(edit.sweep)}), {edit.spec.label()}"
    n = len(choice.search.trials)
    return f"search trial {edit.trial} of {n} ({choice.search.note}): {edit.spec.label()}"


def _edit_section(result: RunResult) -> str:
    """## The edit: the written edit's spec row by row, the layers and writers it touches."""
    edit = written_edit(result, layer_count(result.selection))
    if edit is None:
        return ""
    rows = "\n".join(f"| {k} | {v} |" for k, v in edit_rows(edit))
    return (
        "## The edit\n\nWhat was removed, and where (the kernel weights per layer are drawn in `report.html`; the "
        f"exact spec is `edit.json`):\n\n| | |\n|---|---|\n{rows}\n"
    )


HARMFUL_KEYS = ("refusal_rate", "compliance_rate", "degenerate_rate")
RATES = (
    ("refusal rate on held-out harmful prompts ({h})", "refusal_rate"),
    ("compliance on held-out harmful prompts", "compliance_rate"),
    ("degenerate answers to held-out harmful prompts", "degenerate_rate"),
    ("over-refusal on held-out harmless prompts ({n})", "over_refusal"),
    ("degenerate answers to held-out harmless prompts", "harmless_degenerate_rate"),
)


def _table(b: Metrics, a: Metrics, chosen: Any, label: str, searched: bool) -> str:
    where = f"{chosen.method}, {chosen.layer} / {chosen.position}" if chosen else "-"
    sweep = "search's warm start: the sweep's candidate" if searched else "the sweep's candidate (the edit's direction)"
    cells = [f"| written edit | {label} |", f"| {sweep}: method, layer / position | {where} |"]

    def words(name: str, key: str) -> str:
        if b.behaviour == "refusal":
            return name.format(h=b.n_harmful, n=b.n_harmless)
        return f"{behaviour_label(key, b.behaviour)}, held-out ({b.n_harmful if key in HARMFUL_KEYS else b.n_harmless})"

    cells += [f"| {words(name, key)} | {format_rate(b, key)} -> {format_rate(a, key)} |" for name, key in RATES]
    cells += [
        f"| KL(base, edited), first response token | {a.kl:.4f} |",
        f"| KL(base, edited), first {a.kl_tokens} tokens of the base model's answers | {a.kl_answer:.4f} |",
        f"| perplexity on harmless texts | {b.perplexity:.2f} -> {a.perplexity:.2f} |",
    ]
    return "| | value |\n|---|---|\n" + "\n".join(cells)


def _contract(cfg: dict[str, Any], b: Metrics) -> str:
    sources = f"harmful: {', '.join(cfg.get('harmful') or [])}; harmless: {', '.join(cfg.get('harmless') or [])}"
    system = f"system prompt `{cfg['system']}`" if cfg.get("system") else "no system prompt"
    return (
        f"- prompts: {b.n_harmful} harmful and {b.n_harmless} harmless held-out prompts, never used to find or choose "
        f"the edit ({cfg.get('n_train')} per side built the direction, {cfg.get('n_val')} per side chose it); "
        f"sources {sources}; seed {cfg.get('seed')}\n"
        f"- answers: greedy, at most {cfg.get('max_new_tokens')} new tokens (at least {cfg.get('min_new_tokens')}), "
        f"{system}\n"
        f"- judge: {b.judge} (degenerate answers: empty, non-text, repeated n-grams or loops; they never count as "
        "compliance); rates with 95% Wilson intervals in parentheses\n"
        f"- KL: on the harmless prompts, first response token and mean over the first {cfg.get('kl_tokens')} tokens of "
        "the unedited model's answers"
    )


def _how(result: RunResult) -> str:
    if result.induction:
        return f"and induced (baked into the weights, see `edit.json`): {result.induction.get('note', '')}"
    where = "the weights that write into the residual stream (`W <- W - s r r^T W`)"
    return f"and removed from {where}: {_edit_words(result)}"


def _found(b: Metrics, cfg: dict[str, Any]) -> str:
    n = cfg.get("n_train")
    if b.behaviour == "refusal":
        return f"The refusal direction was found from {n} harmful and {n} harmless prompts"
    return f"The direction of the behaviour profile `{b.behaviour}` was found from {n} behaviour and {n} plain prompts"


def _usage(base: BaseModel, adapter: bool) -> str:
    if not adapter:
        return "Loads with plain `transformers`: `AutoModelForCausalLM.from_pretrained(THIS_FOLDER_OR_REPO)`."
    name = json.dumps(base.hub_id or "BASE_MODEL")
    return (
        "A PEFT LoRA adapter of the base model (the ablation is a rank-k update of each edited module):\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({name})\n"
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER_OR_REPO")  # model.merge_and_unload(): the edited model\n'
        "```"
    )


def model_card(result: RunResult, known: Sequence[KnownModel] = ()) -> str:
    sel, b, a, cfg = result.selection, result.before, result.after, result.config
    adapter = bool(cfg.get("as_adapter"))
    base = base_model_of(str(cfg.get("model")), known)
    title = base.hub_id or Path(str(cfg.get("model"))).name
    edit = written_edit(result, layer_count(result.selection))
    label = headline(edit) if edit else result.choice.label() if result.choice else "-"
    missing = [] if base.hub_id else [f"`base_model` is omitted from the metadata: {base.why}."]
    if not base.license:
        missing.append("The base model's license was not found on disk: check it on the base model's own card.")
    from abliterate.version import __version__

    return f"""{front_matter(base, adapter=adapter)}
# {title}, abliterated{" (LoRA adapter)" if adapter else ""}

Made with [abliterate](https://pypi.org/project/abliterate/) {__version__} from `{cfg.get("model")}`. {_found(b, cfg)}
{_how(result)}.
{" ".join(missing)}

{_edit_section(result)}
## Before / after

{_table(b, a, sel.chosen, label, bool(edit and edit.searched))}

{result.note}

## Evaluation contract

{_contract(cfg, b)}

## Use

{_usage(base, adapter)}

## Files and how to reproduce

The direction set is in `directions.safetensors`, the chosen edit in `edit.json`, every number in `metrics.json`,
the effective configuration and versions in `abliterate_config.json`, plots in `report.html`. `manifest.json`
records the sha256 of the input model's files, of every prompt source, the seed, the full config and of every file
written here. `abliterate verify FOLDER` checks a copy of this repository against it; `abliterate reproduce FOLDER`
finds the same inputs again (the base model at its recorded path or in the hub cache, the prompt files at their
recorded paths), checks them by hash and re-runs: the same versions on the same hardware class give bit-identical
tensors, else it names the first tensor that differs.
"""
