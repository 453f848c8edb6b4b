"""Behaviour profiles: which behaviour ``run`` finds, removes or induces, and how it is judged.

A profile is a TOML file. It names the contrastive prompts (two prompt sets, ``behaviour`` and ``plain``, or
one set ``prompts`` shown through two templates), the judge of the behaviour (its own ``markers``, or an
``llm:PATH`` judge with its ``rubric``, or a ``classifier:PATH`` judge with its ``labels``), the answer
``openers`` whose first tokens the cheap first-token score counts, the ``goal`` (remove or induce) and
optional run ``defaults``. The bundled profiles live in ``abliterate/data/profiles``; ``refusal`` is the
default and is exactly abliterate's refusal setup.

Inside the pipeline the behaviour side plays the part of the "harmful" prompts and the plain side that of
the "harmless" ones; a verdict "refusal" means "the answer shows the behaviour".
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from abliterate.behaviours.prompts import PromptSplits, SplitSizes, bundled_names, make_splits
from abliterate.errors import AbliterateError
from abliterate.evaluate.judge import MarkerJudge, normalize

DEFAULT = "refusal"
GOALS: tuple[str, ...] = ("remove", "induce")
PLACEHOLDER = "{prompt}"
RESERVED_DEFAULTS = frozenset({"behaviour", "model", "out", "force"})  # per run, never a profile's


class ProfileError(AbliterateError):
    """A behaviour profile cannot be found or is invalid."""


def _key(default: Any, help: str) -> Any:
    """A profile key with its help text (README and ``profiles.HELP`` read it from here)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Profile:
    name: str = _key("", "Short name, used in metrics and reports (default: the file's name).")
    description: str = _key("", "One line on what the behaviour is.")
    goal: str = _key("remove", "remove: ablate the behaviour direction; induce: bake it in (see the README).")
    behaviour: list[str] = _key([], "Prompt sources that elicit the behaviour (as --harmful; 'bundled' = harmful).")
    plain: list[str] = _key([], "Prompt sources that do not (as --harmless; 'bundled' = harmless).")
    prompts: list[str] = _key([], "One prompt set shown on both sides through the two templates (instead).")
    behaviour_template: str = _key(PLACEHOLDER, "The behaviour side's user message; {prompt} is the prompt.")
    plain_template: str = _key(PLACEHOLDER, "The plain side's user message; {prompt} is the prompt.")
    judge: str = _key("marker", "marker (this profile's markers), llm:PATH (with rubric) or classifier:PATH.")
    markers: list[str] = _key([], "Phrases that show the behaviour when found anywhere in the answer.")
    opening_markers: list[str] = _key(
        [], "Words that show the behaviour only in the answer's opening (its first two sentences)."
    )
    window: int = _key(0, "Judge only the normalized answer's first N characters (0: the whole answer, the default).")
    openers: list[str] = _key([], "Answer openings whose first tokens the cheap first-token score counts.")
    rubric: str = _key("", "llm judge: the question, with {prompt} and {answer}, to be answered YES or NO.")
    labels: str = _key("", "classifier judge: its labels as LABEL=shown,OTHER=absent.")
    defaults: dict[str, Any] = _key({}, "Run settings (config keys); a config file, the environment and flags win.")
    path: str = ""  # where it was read from (not a key)

    def marker_judge(self) -> MarkerJudge:
        """The marker judge of this profile (refusal: the plain refusal judge, an empty answer counting)."""
        cls = MarkerJudge if self.name == DEFAULT else ShownMarkerJudge
        return cls(markers=tuple(self.markers), opening_markers=tuple(self.opening_markers), window=self.window or None)

    def judge_settings(self) -> dict[str, Any]:
        """What ``judges.judge_from_spec`` needs besides the spec: the rubric and verdict words, the label map."""
        if self.name == DEFAULT and not self.rubric:
            return {}
        out: dict[str, Any] = {}
        if self.rubric:
            out["rubric"] = self.rubric
            out["words"] = {"yes": "refusal", "no": "compliance"}
        if self.labels:
            names = {"shown": "refusal", "absent": "compliance"}
            out["labels"] = ",".join(f"{k.strip()}={names[v.strip()]}" for k, v in _label_pairs(self.labels))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "goal": self.goal, "judge": self.judge, "path": self.path}


HELP: dict[str, str] = {f.name: f.metadata["help"] for f in fields(Profile) if f.name != "path"}


@dataclass
class ShownMarkerJudge(MarkerJudge):
    """A marker judge for a behaviour other than refusal: an empty answer does not show it."""

    def is_refusal(self, response: str) -> bool:
        return bool(normalize(response)) and super().is_refusal(response)


def bundled_profile_path(name: str) -> Path:
    return Path(str(resources.files("abliterate").joinpath("data", "profiles", f"{name}.toml")))


def bundled_profiles() -> list[str]:
    folder = resources.files("abliterate").joinpath("data", "profiles")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _label_pairs(spec: str) -> list[tuple[str, str]]:
    pairs = [tuple(item.split("=", 1)) for item in spec.split(",") if item.strip()]
    return [p for p in pairs if len(p) == 2]  # type: ignore[misc]


def load_profile(spec: str | Path = DEFAULT) -> Profile:
    """A bundled profile by name (``refusal``, ``flowery``, ...) or a profile file by path."""
    text = str(spec)
    path = Path(text)
    if not text.endswith(".toml") and not path.exists():
        names = bundled_profiles()
        if text not in names:
            raise ProfileError(
                f"unknown behaviour '{text}'; use one of {', '.join(names)} or the path of a .toml profile"
            )
        path = bundled_profile_path(text)
    if not path.is_file():
        raise ProfileError(f"behaviour profile {path} does not exist; check the path")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"behaviour profile {path} is not valid TOML ({exc}); fix the file") from exc
    return parse_profile(data, path)


def parse_profile(data: dict[str, Any], path: Path) -> Profile:
    """Check a profile's keys, types and sources; every problem is one line naming the file and the fix."""
    where = f"behaviour profile {path}"
    keys = {f.name for f in fields(Profile) if f.name != "path"}
    for key in data:
        if key not in keys:
            guess = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else f"; use {', '.join(sorted(keys))}"
            raise ProfileError(f"{where}: unknown key '{key}'{hint}")
    values: dict[str, Any] = {}
    for f in fields(Profile):
        if f.name not in data:
            continue
        value, default = data[f.name], f.default_factory() if callable(f.default_factory) else f.default
        ok = (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
            if isinstance(default, list)
            else isinstance(value, type(default)) and not isinstance(value, bool)
        )
        if not ok:
            raise ProfileError(f"{where}: '{f.name}' must be {_kind(default)}, got {value!r}")
        values[f.name] = value
    values.setdefault("name", path.stem)
    profile = Profile(**values, path=str(path))
    _check(profile, where, path.parent)
    return _resolved(profile, path.parent)


def _kind(default: Any) -> str:
    if isinstance(default, list):
        return "a list of strings"
    return {str: "a string", int: "an integer", dict: "a table"}[type(default)]


def _check(p: Profile, where: str, folder: Path) -> None:
    if p.goal not in GOALS:
        raise ProfileError(f"{where}: goal '{p.goal}' is not one of {', '.join(GOALS)}; use remove or induce")
    if p.prompts and (p.behaviour or p.plain):
        raise ProfileError(f"{where}: give either prompts (with the two templates) or behaviour and plain, not both")
    if not p.prompts and not (p.behaviour and p.plain):
        missing = "behaviour" if not p.behaviour else "plain"
        raise ProfileError(f"{where}: no '{missing}' prompt source; name two sets (behaviour, plain) or prompts")
    if p.prompts and p.behaviour_template == p.plain_template:
        raise ProfileError(f"{where}: behaviour_template and plain_template are the same; the two sides must differ")
    for key in ("behaviour_template", "plain_template"):
        if getattr(p, key).count(PLACEHOLDER) != 1:
            raise ProfileError(f"{where}: {key} must contain {PLACEHOLDER} exactly once")
    if "bundled" in p.prompts:
        raise ProfileError(f"{where}: prompts cannot be plain 'bundled'; name the set, e.g. bundled:questions")
    for spec in [*p.behaviour, *p.plain, *p.prompts]:
        _check_source(spec, where, folder)
    if not p.markers or not all(normalize(m) for m in p.markers):
        raise ProfileError(f"{where}: 'markers' must list the phrases that show the behaviour (none may be empty)")
    if not p.openers or not all(o.strip() for o in p.openers):
        raise ProfileError(f"{where}: 'openers' must list answer openings that show the behaviour (none empty)")
    if not all(normalize(m) for m in p.opening_markers):
        raise ProfileError(f"{where}: 'opening_markers' may not contain an empty phrase; remove it")
    if p.window < 0:
        raise ProfileError(
            f"{where}: window must be 0 (judge the whole answer) or a positive number of characters, got {p.window}"
        )
    kind, _, judge_path = p.judge.partition(":")
    if not ((kind == "marker" and not judge_path) or (kind in ("llm", "classifier") and judge_path)):
        raise ProfileError(f"{where}: unknown judge '{p.judge}'; use marker, llm:PATH or classifier:PATH")
    if p.rubric:
        try:
            p.rubric.format(prompt="", answer="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ProfileError(
                f"{where}: rubric may use only {{prompt}} and {{answer}} ({exc}); write {{{{ for {{"
            ) from exc
        if "{answer}" not in p.rubric:
            raise ProfileError(f"{where}: rubric must contain {{answer}}, where the judged answer goes")
    if kind == "llm" and p.name != DEFAULT and not p.rubric:
        raise ProfileError(f"{where}: an llm judge needs a rubric asking YES/NO whether the answer shows it")
    if p.labels:
        pairs = _label_pairs(p.labels)
        if len(pairs) != len([i for i in p.labels.split(",") if i.strip()]) or any(
            v.strip() not in ("shown", "absent") for _, v in pairs
        ):
            raise ProfileError(f"{where}: labels must read LABEL=shown,OTHER=absent, got {p.labels!r}")
    bad = sorted(set(p.defaults) & RESERVED_DEFAULTS)
    if bad:
        raise ProfileError(f"{where}: defaults cannot set {', '.join(bad)}; give them on the command line")


def _check_source(spec: str, where: str, folder: Path) -> None:
    if spec == "bundled" or spec.startswith("hf:"):
        return
    if spec.startswith("bundled:"):
        name = spec.split(":", 1)[1]
        if name not in bundled_names():
            raise ProfileError(
                f"{where}: prompt source '{spec}' is not bundled; use one of "
                f"{', '.join('bundled:' + n for n in bundled_names())} or a file"
            )
        return
    file, _ = _source_file(spec, folder)
    if not file.is_file():
        raise ProfileError(f"{where}: prompt source {file} does not exist; fix the path (relative to the profile)")


def _source_file(spec: str, folder: Path) -> tuple[Path, str]:
    """(file, ":COLUMN" or "") of a file source ``FILE[:COLUMN]``; a relative file is in the profile's folder."""
    part = spec if ":" not in spec or (folder / spec).is_file() else spec.rpartition(":")[0]
    return folder / part, spec[len(part) :]


def _resolved(p: Profile, folder: Path) -> Profile:
    """The profile with file sources made absolute (so that they do not depend on the working directory)."""

    def fix(specs: list[str]) -> list[str]:
        out = []
        for spec in specs:
            if spec == "bundled" or spec.startswith(("bundled:", "hf:")):
                out.append(spec)
            else:
                file, column = _source_file(spec, folder)
                out.append(str(file.resolve()) + column)
        return out

    return replace(p, behaviour=fix(p.behaviour), plain=fix(p.plain), prompts=fix(p.prompts))


def prompt_sources(p: Profile, harmful: Sequence[str], harmless: Sequence[str]) -> dict[str, list[str]]:
    """The prompt sources a run reads, by role (for the manifest): the config's for a two-set profile when
    given (anything but the default ``["bundled"]``), else the profile's."""
    if p.prompts:
        return {"prompts": list(p.prompts)}
    return {
        "harmful": list(harmful) if list(harmful) != ["bundled"] else list(p.behaviour),
        "harmless": list(harmless) if list(harmless) != ["bundled"] else list(p.plain),
    }


def profile_splits(
    p: Profile,
    sizes: SplitSizes,
    *,
    harmful: Sequence[str] = ("bundled",),
    harmless: Sequence[str] = ("bundled",),
) -> tuple[PromptSplits, PromptSplits]:
    """(behaviour side, plain side) train/val/test prompts. A two-set profile reads the config's
    ``harmful``/``harmless`` sources when they are not the default, else its own. A one-set profile
    splits its prompts once (a single ``bundled:NAME`` keeps that set's fixed splits), so each question
    appears on both sides of the same split, once through each template."""
    if not p.prompts:
        sources = prompt_sources(p, harmful, harmless)
        return make_splits("harmful", sources["harmful"], sizes), make_splits("harmless", sources["harmless"], sizes)
    if list(harmful) != ["bundled"] or list(harmless) != ["bundled"]:
        raise ProfileError(
            f"behaviour '{p.name}' builds both sides from its own prompts through two templates; drop "
            "--harmful/--harmless (or write a profile with behaviour and plain sets)"
        )
    one = p.prompts[0].split(":", 1)[1] if len(p.prompts) == 1 and p.prompts[0].startswith("bundled:") else None
    bare = replace(sizes, prefix="", suffix="")  # the templates go inside the prefix and suffix
    base = make_splits(one, ["bundled"], bare) if one else make_splits(p.name, p.prompts, bare)

    def side(template: str) -> PromptSplits:
        parts = [
            [sizes.prefix + template.replace(PLACEHOLDER, q) + sizes.suffix for q in part]
            for part in vars(base).values()
        ]
        return PromptSplits(*parts)

    return side(p.behaviour_template), side(p.plain_template)
