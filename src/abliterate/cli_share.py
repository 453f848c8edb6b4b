"""``abliterate verify`` and ``reproduce`` (manifests), and the manifest of ``apply``'s outputs."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_common import STATE, Opt, app, err, fail, guarded, out, progress_bars, wrote


def load_edit(path: Path) -> tuple[Any, dict[str, Any]]:
    """The :class:`EditSpec` of an ``edit.json`` written by ``run`` (``{"spec": {...}, ...}``), and its content."""
    from .space import EditSpec

    try:
        data = json.loads(path.read_text())
        spec = EditSpec.from_dict(data["spec"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"{path} is not an edit.json written by run ({exc}); pass the edit.json of a run's output")
    return spec, data


def seal_apply(
    folder: str | Path, settings: dict[str, Any], directions_file: Path, edit: Path | None, direction: Any
) -> None:
    """Write the manifest of a finished ``apply`` output (the model written by ``lm.save`` or a streaming edit):
    ``settings`` are apply's options, the edit is ``edit.json``'s or ``direction`` with the settings' scale."""
    from .manifest import write_manifest
    from .pipeline import versions

    if edit is not None:
        chosen = json.loads(edit.read_text())
    else:
        where = {"layer": direction.layer, "position": direction.position, "method": direction.method}
        chosen = {
            "direction": where,
            **{k: settings.get(k) for k in ("mode", "scale", "coefficient", "norm_preserving")},
        }
    write_manifest(
        Path(folder),
        "apply",
        config=settings,
        versions=versions(),
        model=str(settings["model"]),
        files={"directions": directions_file, "edit": edit},
        edit=chosen,
    )


@app.command()
@guarded
def verify(folder: Annotated[Path, typer.Argument(help="An output folder of run, apply or export.")]) -> None:
    """Check a folder against its own manifest.json: every file written is there, unchanged, and nothing else.

    Prints one line per problem and exits 1 when there is any.

    Example: abliterate verify qwen-abliterated
    """
    from .manifest import read_manifest, verify_folder

    problems = verify_folder(folder)
    if STATE["json"]:
        out().print_json(json.dumps({"ok": not problems, "problems": problems}))
    elif not problems:
        count = len(read_manifest(folder)["outputs"])
        out().print(f"{folder}: all {count} files match manifest.json")
    for line in [] if STATE["json"] else problems:
        out().print(line, markup=False, highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


@app.command()
@guarded
def reproduce(
    folder: Annotated[Path, typer.Argument(help="An output folder of run (with its manifest.json).")],
    out_dir: Annotated[
        Path | None, Opt("--out", "-o", help="Keep the re-run here (default: a temporary folder, removed after).")
    ] = None,
    force: Annotated[bool, Opt("--force", help="Replace an existing --out folder.")] = False,
) -> None:
    """Re-run `run` from a folder's manifest and compare: bit-identical, or the first tensor that differs.

    The inputs are found at the paths the manifest records and checked by hash first (a changed model file or
    prompt set is named). Same hardware class and versions give bit-identical tensors; exits 1 when they differ.

    Example: abliterate reproduce qwen-abliterated
    """
    from .manifest import check_inputs, edit_difference, first_tensor_difference, read_manifest, run_config
    from .manifest import verify_folder as check_folder
    from .pipeline import run as run_pipeline
    from .pipeline import versions
    from .saving import check_output

    manifest = read_manifest(folder)
    problems = check_folder(folder)
    if problems:
        fail(f"{folder} does not match its own manifest ({problems[0]}); see abliterate verify {folder}")
    check_inputs(manifest)
    temporary = out_dir is None
    target = Path(tempfile.mkdtemp(prefix="abliterate-reproduce-")) / "run" if temporary else out_dir
    if not temporary:
        check_output(target, overwrite=force, inputs=(folder,))
    cfg = run_config(manifest, target)
    cfg.force = force
    now = versions()
    changed = [f"{k} {now.get(k)} (manifest: {v})" for k, v in manifest.get("versions", {}).items() if now.get(k) != v]
    if changed:
        err().print(f"[yellow]note:[/] other versions than recorded: {', '.join(changed)}", highlight=False)
    try:
        with progress_bars() as progress:
            run_pipeline(cfg, progress)
        difference, tensors = first_tensor_difference(folder, target)
        difference = difference or edit_difference(folder, target)
    finally:
        if temporary:
            shutil.rmtree(target.parent, ignore_errors=True)
    if not temporary:
        wrote(target)
    if STATE["json"]:
        out().print_json(json.dumps({"identical": difference is None, "difference": difference, "tensors": tensors}))
    elif difference is None:
        out().print(f"bit-identical: {tensors} tensors" + ("" if temporary else f" (re-run kept in {target})"))
    else:
        out().print(f"differs: {difference}", markup=False, highlight=False, soft_wrap=True)
    if difference is not None:
        raise typer.Exit(1)
