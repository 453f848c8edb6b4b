"""Upload a finished output folder to the Hugging Face hub (``abliterate push``, ``run --push-to-hub``).

:func:`hub_target` checks everything that can be checked before a long run: the repo id (huggingface_hub's own
validator), that a token is there (``HF_TOKEN``, else the one ``hf auth login`` saved), that the hub accepts it
and that it may write to the repo's namespace. :func:`push` then uploads a folder only when it matches its own
``manifest.json`` (complete and unchanged since it was written): it creates the repository (private unless asked
otherwise; an existing one is kept as it is) and uploads every file in one commit. A failed upload raises
:class:`UploadError` and leaves the local folder as it was. The endpoint is ``endpoint``, else ``$HF_ENDPOINT``,
else huggingface.co.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from abliterate.errors import AbliterateError
from abliterate.outputs.manifest import read_manifest, verify_folder
from abliterate.version import __version__


class HubError(AbliterateError):
    """A repo id, token or endpoint the hub upload cannot use (checked before anything is written)."""


class UploadError(HubError):
    """The upload itself failed; the local folder is intact."""


@dataclass(frozen=True)
class HubTarget:
    """Where a folder goes: ``namespace/name`` (the namespace filled in from the token's user when omitted)."""

    repo_id: str
    token: str
    endpoint: str | None = None
    private: bool = True
    user: str = ""

    def api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=self.token)

    @property
    def where(self) -> str:
        return f"{self.endpoint or 'https://huggingface.co'}/{self.repo_id}"


@dataclass
class Pushed:
    """The outcome of :func:`push`: the repo's URL, the commit's, the files sent, and whether the repo existed
    already (its visibility then is what it was: ``private`` says which, None when the hub did not say)."""

    url: str
    commit_url: str
    files: int
    existed: bool
    private: bool | None


def endpoint_of(endpoint: str | None) -> str | None:
    value = endpoint or os.environ.get("HF_ENDPOINT") or None
    return value.rstrip("/") if value else None


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of ``exc``, and of the error that caused it (a wrapped HTTP error names the status)."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 2:
        lines = [line.strip() for line in str(current).splitlines() if line.strip()]
        parts.append(f"{type(current).__name__}: {lines[0]}" if lines else type(current).__name__)
        current = current.__cause__
    return " <- ".join(parts)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def hub_target(
    repo_id: str, *, private: bool = True, endpoint: str | None = None, token: str | None = None
) -> HubTarget:
    """The checked destination of an upload; raises :class:`HubError` naming the problem (malformed repo id, no
    token, a token the hub refuses or that cannot write to the namespace, an unreachable endpoint)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(
            f"'{repo_id}' is not a hub repo id ({str(exc).splitlines()[0]}); use NAME or NAMESPACE/NAME "
            "with letters, digits, '-', '_' or '.'"
        ) from None
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (a token with write access)")
    endpoint = endpoint_of(endpoint)
    where = endpoint or "https://huggingface.co"
    try:
        me = HfApi(endpoint=endpoint).whoami(token=token)
    except Exception as exc:  # the first contact with the hub: a refused token or no connection, said in one line
        if _status(exc) == 401:
            problem = f"{where} refused the Hugging Face token (401): set HF_TOKEN to a valid write token"
        else:
            problem = f"cannot check the token with {where} ({_reason(exc)}); check the network or --endpoint"
        raise HubError(problem) from None
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    user = str(me.get("name", ""))
    if role == "read":
        raise HubError(f"the Hugging Face token of {user} is read-only; create a token with write access")
    namespace, _, name = repo_id.rpartition("/")
    if not namespace:
        repo_id = f"{user}/{name}"
    else:
        mine = {user.lower(), *(str(o.get("name", "")).lower() for o in me.get("orgs") or [])}
        if namespace.lower() not in mine:
            raise HubError(
                f"the token belongs to {user}, who cannot write to '{namespace}'; use {user}/{name} or an "
                "organization of yours"
            )
    return HubTarget(repo_id, token, endpoint, private, user)


def check_folder(folder: Path) -> int:
    """The number of files of ``folder`` after checking it against its manifest; raises :class:`HubError` when
    it has none or does not match it (an unfinished or changed folder is never uploaded)."""
    problems = verify_folder(folder)
    if problems:
        raise HubError(
            f"{folder} does not match its manifest.json ({problems[0]}), so nothing was uploaded; "
            f"see abliterate verify {folder}"
        )
    return len(read_manifest(folder)["outputs"]) + 1


def push(folder: str | Path, target: HubTarget, *, message: str | None = None) -> Pushed:
    """Upload ``folder`` (checked against its manifest first) to ``target`` in one commit; raises
    :class:`UploadError` when the hub fails, leaving ``folder`` untouched."""
    folder = Path(folder)
    files = check_folder(folder)
    api = target.api()
    existed, private = False, None
    try:
        try:
            api.create_repo(target.repo_id, private=target.private, exist_ok=False)
        except Exception as exc:
            if _status(exc) != 409:
                raise
            existed = True
            private = getattr(api.model_info(target.repo_id), "private", None)
        commit = api.upload_folder(
            repo_id=target.repo_id,
            folder_path=folder,
            commit_message=message or f"Upload {folder.name} (abliterate {__version__})",
        )
    except Exception as exc:  # every failure of the hub or the network: one line, the folder kept
        raise UploadError(
            f"upload to {target.where} failed ({_reason(exc)}); the local folder {folder} is intact: "
            f"retry with abliterate push {folder} {target.repo_id}"
        ) from None
    return Pushed(target.where, str(commit.commit_url), files, existed, private if existed else target.private)
