"""Run configuration: defaults < the behaviour profile's [defaults] < TOML file < environment
(``ABLITERATE_<KEY>``) < command-line flags.

Keys mirror the CLI flags with dashes turned into underscores (``--kl-threshold`` is
``kl_threshold``). Unknown keys are errors with a did-you-mean suggestion.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from abliterate.errors import AbliterateError
from abliterate.select.search_space import RANGE_LIMITS, SearchSettings, SearchSpace
from abliterate.select.search_study import CHECK_SHARE


class ConfigError(AbliterateError):
    """A configuration file, variable or value is invalid."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field whose help text is defined once: the CLI option and the docs read it from here."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


_SETTINGS, _SPACE = SearchSettings(), SearchSpace()  # the library's defaults: the [search] table's too


@dataclass
class SearchConfig:
    """The ``[search]`` table: how ``run`` chooses its edit (see abliterate.select.search and abliterate.edit.spec)."""

    enabled: bool = _opt(True, "Search the edit space (false: the sweep's one direction at full strength).")
    trials: int | None = _opt(
        None,
        f"Finished trials wanted (default {_SETTINGS.trials} without --timeout; a resumed journal counts its own).",
    )
    timeout: float | None = _opt(
        None,
        "Wall-clock limit of the search in seconds, its front check included (with or instead of trials): the "
        f"trials stop at {1 - CHECK_SHARE:.0%} of it, the check when it runs out.",
    )
    kl_budget: float = _opt(
        _SETTINGS.kl_budget, "Pick the fewest refusals among front trials with first-token KL <= this."
    )
    trial: int | None = _opt(None, "Take this trial number from the Pareto front instead of the default policy.")
    resume: bool = _opt(False, "Continue the search journal an interrupted run left beside --out.")
    pick_wait: float = _opt(
        60.0,
        "On a terminal, seconds the Pareto-front prompt waits for a trial number before keeping the default "
        "pick (0: never ask; never asked off a terminal, with --trial or --json).",
    )
    seed: int = _opt(_SETTINGS.seed, "Sampler seed (the search is deterministic under a seed on the same machine).")
    startup: int = _opt(_SETTINGS.startup, "Random trials before TPE models the front (after the enqueued warm start).")
    warm_start: int = _opt(3, "The sweep's best candidates tried first, at full strength.")
    verify_top: int = _opt(
        _SETTINGS.verify_top, "Front trials checked by generating and judging answers (0: cheap scores only)."
    )
    verify_tokens: int = _opt(24, "Tokens generated per harmful validation prompt in that check.")
    methods: list[str] = _opt(list(_SPACE.methods), "Direction methods searched.")
    max_k: int = _opt(_SPACE.max_k, "Largest number of directions removed jointly.")
    per_layer: bool = _opt(_SPACE.per_layer, "Also search 'each writer removes its own layer's direction'.")
    embedding: bool = _opt(_SPACE.embedding, "Search editing the embeddings (on/off).")
    norm_preserving: list[bool] = _opt(list(_SPACE.norm_preserving), "Norm-preserving edit choices searched.")
    direction_range: list[float] = _opt(
        list(_SPACE.direction_range), "Direction index range, as fractions of the layer count (within [0, 1])."
    )
    peak_range: list[float] = _opt(
        list(_SPACE.peak_range), "Kernel peak range, as fractions of the last layer index (within [0, 1])."
    )
    weight_range: list[float] = _opt(list(_SPACE.weight_range), "Kernel peak weight range.")
    allow_over_budget: bool = _opt(
        _SETTINGS.allow_over_budget,
        "With no front trial inside --kl-budget, write the lowest-KL one anyway (default: refuse, writing nothing).",
    )
    check_prompts: int = _opt(
        32,
        "Held-out prompts per side the front check generates on: drawn from what the train split leaves over, "
        "never the validation prompts the objectives saw nor the evaluation's test prompts.",
    )
    answer_kl_budget: float = _opt(
        0.02,
        "The front check's budget on answer KL (teacher-forced along the unedited model's own answers to the "
        "harmless check prompts): a checked trial above it is picked only when none is within every budget.",
    )
    degenerate_allowance: int = _opt(
        1,
        "A checked trial may give at most this many more degenerate (looping, garbled, empty) answers to the "
        "harmless check prompts than the unedited model, else it is over budget.",
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SEARCH_HELP = {f.name: f.metadata["help"] for f in fields(SearchConfig)}


@dataclass
class RunConfig:
    """One run's settings (``run``, ``measure``, ``eval``): each field's help text is the CLI option's."""

    model: str = _opt("", "Hub id, local model directory or .gguf file.")
    out: str = _opt("", "Output directory (must not exist unless --force).")
    dtype: str | None = _opt(None, "float32, bfloat16, float16 or auto (default: float32 on CPU).")
    device: str = _opt("cpu", "cpu, cuda, cuda:1, mps ... (the whole model on one device).")
    device_map: str | None = _opt(
        None, "auto, balanced or sequential: spread the model over GPUs, CPU and disk (accelerate)."
    )
    max_memory: str | None = _opt(None, "Per-device cap with --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB.")
    offload_folder: str | None = _opt(None, "Folder for weights offloaded to disk.")
    quantize: str | None = _opt(None, "4bit or 8bit: load linear layers through bitsandbytes (capture, eval).")
    trust_remote_code: bool = _opt(False, "Run the model repository's own modelling code (only for repos you trust).")
    chat_template: str | None = _opt(None, "A Jinja chat template (file or text) for a model without one.")
    system: str | None = _opt(None, "System prompt for every conversation.")
    disable_thinking: bool = _opt(
        False, "Pass enable_thinking=False to the chat template (Qwen3 and alike: empty thinking block)."
    )
    response_prefix: str = _opt("", "Text appended after the generation prompt: every reply starts with it.")
    behaviour: str = _opt(  # a bundled name or a .toml path (abliterate.behaviours.profiles)
        "refusal", "Behaviour profile: refusal (default), flowery, or a .toml profile (its prompts, judge and goal)."
    )
    harmful: list[str] = _opt(
        ["bundled"], "Prompt source(s): bundled, FILE.txt/.jsonl/.csv/.parquet[:COL], hf:ID[:SPLIT[:COL]]."
    )
    harmless: list[str] = _opt(["bundled"], "Prompt source(s) for harmless prompts.")
    prompt_prefix: str = _opt("", "Text put before every prompt (both sides).")
    prompt_suffix: str = _opt("", "Text put after every prompt (both sides).")
    n_train: int = _opt(64, "Prompts per side that build the direction.")
    n_val: int = _opt(16, "Validation prompts per side (candidate selection).")
    n_test: int = _opt(  # evaluation.N_TEST
        64, "Held-out prompts per side for the before/after evaluation (default 64)."
    )
    seed: int = _opt(0, "Sampling seed for prompt sets.")
    positions: list[int] = _opt([-1], "Token offsets from the prompt end (repeatable).")
    methods: list[str] = _opt(["mean_diff"], "mean_diff, slerp or projected (repeatable).")
    slerp_t: float = _opt(1.0, "slerp's interpolation t in (0, 1].")
    layers: list[int] | None = _opt(None, "Restrict candidate layers (repeatable).")
    skip_last: float = _opt(0.2, "The last fraction of layers, never chosen.")
    kl_threshold: float = _opt(0.1, "Maximum KL for a candidate.")
    min_induce: float = _opt(0.5, "A candidate must raise the harmless prompts' refusal score by more than this.")
    min_bypass_drop: float = _opt(1.0, "A candidate must lower the harmful prompts' refusal score by more than this.")
    scale: float = _opt(1.0, "Fraction of the direction to remove (1 = all).")
    norm_preserving: bool = _opt(False, "Keep writer norms.")
    batch_size: int = _opt(16, "Prompts per forward pass.")
    max_new_tokens: int = _opt(  # evaluation.MAX_NEW_TOKENS
        100, "Final evaluation: at most this many new tokens per answer (default 100)."
    )
    min_new_tokens: int = _opt(0, "Final evaluation: at least this many (default 0: the model may stop earlier).")
    kl_tokens: int = _opt(16, "Multi-token KL over this many tokens of the unedited model's answers (default 16).")
    eval_cache: bool = _opt(
        True,
        "Reuse the unedited model's evaluation from an earlier run with the same model weights, prompts, template "
        "and generation settings (kept in the cache dir's evaluations/; answers are judged again each run).",
    )
    judge: str = _opt(
        "marker", "marker (default: the behaviour profile's phrases), llm:PATH (a local LM) or classifier:PATH."
    )
    judge_labels: str | None = _opt(None, "Classifier judge label map, e.g. 'LABEL_1=refusal,LABEL_0=compliance'.")
    samples: int = _opt(6, "Sample answers shown per condition in the report.")
    force: bool = _opt(False, "Replace an existing output directory.")
    as_adapter: bool = _opt(
        False,
        "Write the edit as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) instead of the "
        "edited model's weights.",
    )
    search: SearchConfig = field(default_factory=SearchConfig, metadata={"help": "The [search] table."})
    adapter: bool = _opt(
        False,
        "Keep the search to edits a PEFT adapter holds exactly (no norm preservation; no embedding edit where writer "
        "biases need lora_bias) and write the edited model as usual: `export OUT --format peft` then gives it "
        "exactly (--as-adapter writes the adapter instead of the model).",
    )
    gguf: bool = _opt(
        True,
        "When the model is a .gguf file, also write the edited model as DIR/<name>-abliterated.gguf (+ Modelfile).",
    )
    gguf_type: str = _opt(
        "auto",
        "Type of the edited GGUF tensors: auto (the source's where gguf can write it, else Q8_0), F32, F16, BF16, "
        "Q8_0, Q5_1, Q5_0, Q4_1 or Q4_0.",
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`abliterate.load_model` this config sets (where and how to load)."""
        return {name: getattr(self, name) for name in LOAD_FIELDS}


# RunConfig fields that are load_model's keyword arguments, by the same name.
LOAD_FIELDS = (
    "dtype",
    "device",
    "device_map",
    "max_memory",
    "offload_folder",
    "quantize",
    "trust_remote_code",
    "chat_template",
)
RUN_HELP = {f.name: f.metadata["help"] for f in fields(RunConfig)}
SECTIONS: dict[str, type] = {"search": SearchConfig}  # TOML tables; keys "search.trials", env ABLITERATE_SEARCH_TRIALS
KEYS = {f.name for f in fields(RunConfig) if f.name not in SECTIONS} | {
    f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)
}
NON_CONFIG_ENV = frozenset({"ABLITERATE_CACHE", "ABLITERATE_TEST_CACHE"})  # cache locations, not run settings
HINTS = get_type_hints(RunConfig) | {
    f"{name}.{key}": hint for name, cls in SECTIONS.items() for key, hint in get_type_hints(cls).items()
}


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
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
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
    from abliterate.measure.directions import METHODS

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
    validate_search(cfg.search)
    if any(p >= 0 for p in cfg.positions):
        raise ConfigError(f"positions must be negative offsets from the prompt end (e.g. -1), got {cfg.positions}")
    return cfg


def validate_search(sc: SearchConfig) -> None:
    from abliterate.measure.directions import METHODS

    if sc.trials is not None and sc.trials < 1:
        raise ConfigError(f"search.trials (--trials) must be at least 1, got {sc.trials}")
    if sc.timeout is not None and not 0 < sc.timeout < float("inf"):
        raise ConfigError(f"search.timeout (--timeout) must be a positive number of seconds, got {sc.timeout}")
    if not (isinstance(sc.pick_wait, (int, float)) and 0 <= sc.pick_wait < float("inf")):
        raise ConfigError(f"search.pick_wait (--pick-wait) must be 0 or a number of seconds, got {sc.pick_wait}")
    if not 0 < sc.kl_budget < float("inf"):
        raise ConfigError(f"search.kl_budget (--kl-budget) must be a positive number, got {sc.kl_budget}")
    for key in ("startup", "warm_start", "verify_top"):
        if getattr(sc, key) < 0:
            raise ConfigError(f"search.{key} must be >= 0, got {getattr(sc, key)}")
    if sc.verify_tokens < 1 or sc.max_k < 1:
        raise ConfigError("search.verify_tokens and search.max_k must be at least 1")
    bad = [m for m in sc.methods if m not in METHODS]
    if not sc.methods or bad:
        raise ConfigError(f"search.methods {sc.methods}: use some of {', '.join(METHODS)}")
    if not sc.norm_preserving:
        raise ConfigError("search.norm_preserving is empty; use [false], [true] or [false, true]")
    for key in ("direction_range", "peak_range", "weight_range"):
        pair, top = getattr(sc, key), RANGE_LIMITS.get(key, (math.inf, ""))
        if len(pair) != 2 or not (0 <= pair[0] <= pair[1] <= top[0] and math.isfinite(pair[1])):
            bound = f" <= {top[0]:g} ({top[1]})" if math.isfinite(top[0]) else " (finite)"
            raise ConfigError(f"search.{key} must be two numbers 0 <= low <= high{bound}, got {pair}")
    validate_check(sc)


def validate_check(sc: SearchConfig) -> None:
    """The front check's keys: its prompt count and its two budgets."""
    if sc.check_prompts < 1:
        raise ConfigError(f"search.check_prompts must be at least 1, got {sc.check_prompts}")
    if not 0 < sc.answer_kl_budget < float("inf"):
        raise ConfigError(f"search.answer_kl_budget must be a positive number, got {sc.answer_kl_budget}")
    if sc.degenerate_allowance < 0:
        raise ConfigError(f"search.degenerate_allowance must be >= 0, got {sc.degenerate_allowance}")


def profile_defaults(behaviour: str) -> dict[str, Any]:
    """The ``[defaults]`` of a behaviour profile as checked config values (``search`` table flattened)."""
    from abliterate.behaviours.profiles import ProfileError, load_profile

    profile = load_profile(behaviour)
    flat: dict[str, Any] = {}
    for k, v in profile.defaults.items():
        if k in SECTIONS and isinstance(v, dict):
            flat.update({f"{k}.{sk}": sv for sk, sv in v.items()})
        else:
            flat[k] = v
    try:
        return {k: coerce(k, v) for k, v in flat.items()}
    except ConfigError as exc:
        raise ProfileError(f"behaviour profile {profile.path}, table defaults: {exc}") from exc


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
        for k, v in data.items():
            k = k.replace("-", "_")
            if k in SECTIONS and isinstance(v, dict):
                values.update(
                    {f"{k}.{sk.replace('-', '_')}": coerce(f"{k}.{sk.replace('-', '_')}", sv) for sk, sv in v.items()}
                )
            else:
                values[k] = coerce(k, v)
    environ = os.environ if env is None else env
    for name, raw in environ.items():
        if name.startswith("ABLITERATE_") and name not in NON_CONFIG_ENV:
            key = name[len("ABLITERATE_") :].lower()
            section = next(
                (s for s in SECTIONS if key.startswith(s + "_") and f"{s}.{key[len(s) + 1 :]}" in KEYS), None
            )
            key = f"{section}.{key[len(section) + 1 :]}" if section else key
            values[key] = coerce(key, raw)
    for key, value in (flags or {}).items():
        values[key] = coerce(key, value)
    values.update({k: v for k, v in profile_defaults(values.get("behaviour", "refusal")).items() if k not in values})
    plain = {k: v for k, v in values.items() if "." not in k}
    tables = {
        name: cls(**{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(name + ".")})
        for name, cls in SECTIONS.items()
    }
    return validate(RunConfig(**plain, **tables))
