"""``abliterate verify``, ``reproduce`` (manifests) and ``push`` (hub upload); the hub options of ``run``,
``apply`` and ``export``."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from huggingface_hub.utils import disable_progress_bars

from abliterate.cli.common import STATE, Opt, app, err, fail, guarded, out, progress_bars, wrote
from abliterate.lm.saving import check_output
from abliterate.outputs.hub import HubTarget, UploadError, hub_target
from abliterate.outputs.hub import check_folder as check_uploadable
from abliterate.outputs.hub import push as push_folder
from abliterate.outputs.manifest import (
    check_inputs,
    edit_difference,
    first_tensor_difference,
    read_manifest,
    verify_folder,
)
from abliterate.run.pipeline import run as run_pipeline
from abliterate.run.pipeline import versions
from abliterate.run.run_manifest import run_config

P = ParamSpec("P")
R = TypeVar("R")

PUSH_OPT = Annotated[
    str | None,
    Opt(
        "--push-to-hub",
        help="After a successful run, upload the output folder to this hub repo (NAME or NAMESPACE/NAME); the repo "
        "id and token are checked first.",
        rich_help_panel="Hub",
    ),
]
PUBLIC_OPT = Annotated[
    bool, Opt("--public", help="Create the hub repo public (default: private).", rich_help_panel="Hub")
]
ENDPOINT_OPT = Annotated[
    str | None,
    Opt("--endpoint", help="Hub endpoint (default: $HF_ENDPOINT, else https://huggingface.co).", rich_help_panel="Hub"),
]


def hub_destination(repo_id: str | None, public: bool, endpoint: str | None) -> HubTarget | None:
    """The checked :class:`~abliterate.outputs.hub.HubTarget` of ``--push-to-hub`` (None without it), before any
    work."""
    if repo_id is None:
        if public or endpoint:
            fail("--public and --endpoint apply to an upload; add --push-to-hub REPO_ID")
        return None
    return hub_target(repo_id, private=not public, endpoint=endpoint)


def pushes_output(fn: Callable[P, R]) -> Callable[P, R]:
    """For a command that writes an ``--out`` folder (``out_dir``) and takes the hub options: check them before the
    command runs, and upload the folder it wrote (``wrote``) once it has succeeded."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        hub = hub_destination(kwargs.get("push_to_hub"), bool(kwargs.get("public")), kwargs.get("endpoint"))
        if hub is not None and not kwargs.get("out_dir"):
            fail("--push-to-hub uploads the --out folder; pass --out DIR")
        result = fn(*args, **kwargs)
        if hub is not None:
            upload(Path(STATE["wrote"]), hub)
        return result

    return wrapper


def upload(folder: Path, target: HubTarget) -> None:
    """Push a finished ``folder`` to ``target``; a failed upload is one line and exit 1, the folder kept."""
    if STATE["quiet"] or STATE["json"]:
        disable_progress_bars()
    try:
        pushed = push_folder(folder, target)
    except UploadError as exc:
        fail(str(exc), code=1)
    visibility = {True: "private", False: "public", None: "visibility unknown"}[pushed.private]
    kept = " (it existed already: its visibility was left as it was)" if pushed.existed else ""
    line = f"uploaded {pushed.files} files to [bold]{pushed.url}[/] ({visibility}){kept}"
    if STATE["json"]:
        err().print(line, soft_wrap=True)
    else:
        out().print(line, soft_wrap=True)


@app.command()
@guarded
def verify(folder: Annotated[Path, typer.Argument(help="An output folder of run, apply or export.")]) -> None:
    """Check a folder against its own manifest.json: every file written is there, unchanged, and nothing else.

    Prints one line per problem and exits 1 when there is any.

    Example: abliterate verify qwen-abliterated
    """
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
    manifest = read_manifest(folder)
    problems = verify_folder(folder)
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


@app.command()
@guarded
def push(
    folder: Annotated[Path, typer.Argument(help="An output folder of run, apply or export (with its manifest.json).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo: NAME (under your user) or NAMESPACE/NAME.")],
    public: PUBLIC_OPT = False,
    endpoint: ENDPOINT_OPT = None,
) -> None:
    """Upload an output folder to the Hugging Face hub, in one commit.

    The folder must match its own manifest.json (complete and unchanged: see abliterate verify). The repo is
    created private unless --public (an existing repo is kept with its visibility). The token is HF_TOKEN, else
    the one `hf auth login` saved. A failed upload leaves the folder as it is and exits 1.

    Example: abliterate push qwen-abliterated me/qwen-abliterated
    """
    check_uploadable(folder)  # before the token check: a folder that cannot go up is said first
    upload(folder, hub_destination(repo_id, public, endpoint))
