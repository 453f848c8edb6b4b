"""Run configuration: defaults < TOML file < environment (``ABLITERATE_<KEY>``) < command-line flags.

Keys mirror the CLI flags with dashes turned into underscores (``--kl-threshold`` is
``kl_threshold``). Unknown keys are errors with a did-you-mean suggestion.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import AbliterateError


class ConfigError(AbliterateError):
    """A configuration file, variable or value is invalid."""


@dataclass
class RunConfig:
    model: str = ""
    out: str = ""
    dtype: str | None = None
    device: str = "cpu"
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    quantize: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None
    system: str | None = None
    disable_thinking: bool = False
    response_prefix: str = ""
    harmful: list[str] = field(default_factory=lambda: ["bundled"])
    harmless: list[str] = field(default_factory=lambda: ["bundled"])
    prompt_prefix: str = ""
    prompt_suffix: str = ""
    n_train: int = 64
    n_val: int = 16
    n_test: int = 64  # held-out prompts per side for the final evaluation (evaluation.N_TEST)
    seed: int = 0
    positions: list[int] = field(default_factory=lambda: [-1])
    methods: list[str] = field(default_factory=lambda: ["mean_diff"])
    slerp_t: float = 1.0
    layers: list[int] | None = None
    skip_last: float = 0.2
    kl_threshold: float = 0.1
    min_induce: float = 0.5
    min_bypass_drop: float = 1.0
    scale: float = 1.0
    norm_preserving: bool = False
    batch_size: int = 16
    max_new_tokens: int = 100  # final-evaluation answers: up to this many new tokens (evaluation.MAX_NEW_TOKENS)
    min_new_tokens: int = 0  # and at least this many (0: a model that stops early is not forced on)
    kl_tokens: int = 16  # multi-token KL: averaged over this many tokens of the base model's answers
    judge: str = "marker"  # final-evaluation judge: marker, llm:PATH or classifier:PATH
    judge_labels: str | None = None  # classifier judge: LABEL=refusal,OTHER=compliance
    samples: int = 6
    force: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


KEYS = {f.name for f in fields(RunConfig)}
NON_CONFIG_ENV = frozenset({"ABLITERATE_CACHE", "ABLITERATE_TEST_CACHE"})  # cache locations, not run settings
HINTS = get_type_hints(RunConfig)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for hints like ``int``, ``str | None``, ``list[int] | None``."""
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = type(None) in get_args(hint)
    if get_origin(hint) is list:
        return hint, False
    if len(args) == 1 and optional:
        return args[0], True
    return hint, optional


def coerce(key: str, value: Any) -> Any:
    """Check and convert one value (from TOML, an environment string or a flag) to the key's type."""
    if key not in KEYS:
        guess = difflib.get_close_matches(key, sorted(KEYS), n=1)
        raise ConfigError(f"unknown config key '{key}'" + (f"; did you mean '{guess[0]}'?" if guess else ""))
    hint, optional = _base_type(HINTS[key])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none")):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' cannot be empty")
    try:
        if get_origin(hint) is list:
            (item,) = get_args(hint)
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
            return [item(v.strip() if isinstance(v, str) else v) for v in items]
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key '{key}' has an invalid value {value!r} (expected {hint})") from exc


def validate(cfg: RunConfig) -> RunConfig:
    from .directions import METHODS

    for m in cfg.methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method '{m}'; use one of {', '.join(METHODS)}")
    for key in ("n_train", "n_val", "n_test", "batch_size", "max_new_tokens", "kl_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.min_new_tokens < 0:
        raise ConfigError(f"min_new_tokens must be >= 0, got {cfg.min_new_tokens}")
    if cfg.min_new_tokens > cfg.max_new_tokens:
        raise ConfigError(
            f"min_new_tokens ({cfg.min_new_tokens}) is above max_new_tokens ({cfg.max_new_tokens}); "
            "lower --min-new-tokens or raise --max-new-tokens"
        )
    kind, _, path = cfg.judge.partition(":")
    if not ((kind == "marker" and not path) or (kind in ("llm", "classifier") and path)):
        raise ConfigError(f"unknown judge {cfg.judge!r}; use marker, llm:PATH or classifier:PATH")
    if cfg.judge_labels and kind != "classifier":
        raise ConfigError("judge_labels is for a classifier judge (judge = classifier:PATH)")
    if cfg.scale < 0:
        raise ConfigError(f"scale must be >= 0, got {cfg.scale}")
    if not 0 <= cfg.skip_last < 1:
        raise ConfigError(f"skip_last must be in [0, 1), got {cfg.skip_last}")
    if not 0 < cfg.slerp_t <= 1:
        raise ConfigError(f"slerp_t must be in (0, 1], got {cfg.slerp_t}")
    if cfg.quantize is not None and cfg.quantize not in ("4bit", "8bit"):
        raise ConfigError(f"quantize must be 4bit or 8bit, got {cfg.quantize!r}")
    if cfg.max_memory is not None and cfg.device_map is None:
        raise ConfigError("max_memory needs device_map (e.g. --device-map auto)")
    if any(p >= 0 for p in cfg.positions):
        raise ConfigError(f"positions must be negative offsets from the prompt end (e.g. -1), got {cfg.positions}")
    return cfg


def load(
    path: str | Path | None = None, flags: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> RunConfig:
    """Build the effective config. ``flags`` holds only the flags the user actually gave."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; check the path")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
        values.update({k.replace("-", "_"): coerce(k.replace("-", "_"), v) for k, v in data.items()})
    environ = os.environ if env is None else env
    for name, raw in environ.items():
        if name.startswith("ABLITERATE_") and name not in NON_CONFIG_ENV:
            key = name[len("ABLITERATE_") :].lower()
            values[key] = coerce(key, raw)
    for key, value in (flags or {}).items():
        values[key] = coerce(key, value)
    return validate(RunConfig(**values))
