"""The manifest of a run, and the run a manifest records: :mod:`abliterate.outputs.manifest` knows files and hashes,
this module knows run configs and behaviour profiles (so that the manifest does not reach up into them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from abliterate.behaviours.profiles import Profile, bundled_profile_path, prompt_sources
from abliterate.errors import AbliterateError
from abliterate.outputs.manifest import ManifestError, prompt_inputs, write_manifest
from abliterate.run.config import RunConfig, load


def write_run_manifest(
    folder: Path, cfg: RunConfig, profile: Profile, versions: Mapping[str, str], command: str = "run"
) -> Path:
    """The manifest of a ``run`` (or ``measure``) output: model, prompt sources, seed, config, versions, the
    chosen edit (edit.json), outputs. A behaviour profile other than the bundled refusal one is an input file
    (``profile``), and its prompt sources are the prompts."""
    own = profile.name == "refusal" and profile.path == str(bundled_profile_path("refusal"))
    return write_manifest(
        folder,
        command,
        config=cfg.to_dict(),
        versions=versions,
        model=cfg.model,
        prompts=prompt_inputs(prompt_sources(profile, cfg.harmful, cfg.harmless)),
        files=None if own else {"profile": Path(profile.path)},
        seed=cfg.seed,
    )


def run_config(manifest: Mapping[str, Any], out: Path) -> RunConfig:
    """The ``run`` config recorded in ``manifest``, writing to ``out``, with its inputs at their recorded paths
    (a relative model or prompt path is made absolute) and the environment ignored."""
    if manifest.get("command") != "run":
        raise ManifestError(
            f"this folder was written by '{manifest.get('command')}', and only run outputs can be reproduced"
        )
    flat: dict[str, Any] = {}
    for key, value in manifest["config"].items():
        if isinstance(value, Mapping):  # a config table ([search]) travels as section.key
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    inputs = manifest.get("inputs") or {}
    model = inputs.get("model") or {}
    if model.get("local") and model.get("path"):
        flat["model"] = model["path"]
    recorded = {(p["kind"], p["spec"]): p.get("path") for p in inputs.get("prompts", [])}
    for kind in ("harmful", "harmless"):
        flat[kind] = [_absolute(spec, recorded.get((kind, spec))) for spec in flat.get(kind, [])]
    profile = (inputs.get("files") or {}).get("profile")
    if profile:  # the behaviour profile, found again at its recorded path
        flat["behaviour"] = profile["path"]
    flat.update(out=str(out), force=False)
    flat.pop("search.resume", None)
    try:
        return load(None, flat, env={})
    except AbliterateError as exc:
        raise ManifestError(f"the manifest's config is not usable by this abliterate: {exc}") from exc


def _absolute(spec: str, path: str | None) -> str:
    """A prompt spec whose file part is replaced by its recorded absolute path (the column kept)."""
    if path is None or Path(spec).is_absolute():
        return spec
    if Path(spec).exists() or ":" not in spec:
        return path
    return f"{path}:{spec.partition(':')[2]}"
