"""Running peer tools (heretic, abliterix) as programs for bench/vs_heretic.py: their virtual environments,
config files, prompt files, Optuna journals and abliterix's non-interactive run.

Nothing of either tool's code is copied or imported here (both are AGPL); they run as separate processes, and
their journals are read with the optuna of their own environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from abliterate.behaviours.prompts import bundled

ABLITERIX = "abliterix==1.12.2"


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PROMPT_TOOLKIT_NO_CPR="1",
        TERM="xterm",
        PYTHONUNBUFFERED="1",
    )
    return env


def setup_venv(venv: Path, spec: str, exe: str) -> Path:
    """A venv reusing the system torch, with ``spec`` installed; returns the path of its ``exe`` script."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    if not (venv / "bin" / exe).exists():
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", spec], check=True)
    return venv / "bin" / exe


SENTINEL = "\x1fSYSTEM\x1f"


def template_default_system(model: str) -> str | None:
    """The system text that, given as an explicit system message, renders this model's chat template exactly as no
    system message does (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ..."), ``""`` when a template without a
    default renders an empty system message as none, else None (no explicit system message matches "none").

    heretic 1.4.0 always sends a system message (its ``system_prompt``, default "You are a helpful assistant.");
    abliterix 1.12.2 sends one unless its ``system_prompt`` is empty; abliterate and bench/heldout.py send none. This
    is what to give the peers so that all three, and the judge, see the same prompt text."""
    from transformers import AutoTokenizer  # only here: the rest of this module never loads a model

    tok = AutoTokenizer.from_pretrained(model)

    def render(system: str | None) -> str:
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": "Hello"}
        ]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    none = render(None)
    try:
        marked = render(SENTINEL)
        empty = render("")
    except Exception:  # noqa: BLE001 - a template that rejects system messages (e.g. Gemma 2): no text matches
        return None
    pre, _, post = marked.partition(SENTINEL)
    if none.startswith(pre) and none.endswith(post) and len(none) >= len(pre) + len(post):
        default = none[len(pre) : len(none) - len(post)]
        if render(default) == none:
            return default
    return "" if empty == none else None


def write_prompts(folder: Path) -> dict[str, Path]:
    """The bundled train and val splits as ``KIND_SPLIT.txt`` (one prompt a line) and, for tools that read
    prompt folders through ``datasets.load_dataset``, as ``KIND_SPLIT/train.jsonl`` (column ``text``)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in ("harmful", "harmless"):
        for split in ("train", "val"):
            prompts = [p.replace("\n", " ") for p in bundled(kind, split)]  # type: ignore[arg-type]
            path = folder / f"{kind}_{split}.txt"
            path.write_text("\n".join(prompts) + "\n")
            files[f"{kind}_{split}"] = path
            sub = folder / f"{kind}_{split}"
            sub.mkdir(exist_ok=True)
            (sub / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
            files[f"{kind}_{split}_dir"] = sub
    return files


def toml_value(text: str) -> Any:
    """A ``KEY=VALUE`` override's value: TOML if it parses (numbers, booleans, arrays, quoted strings), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` or ``TABLE.KEY=VALUE`` overrides into a config dict."""
    for item in items:
        key, _, value = item.partition("=")
        *tables, leaf = key.strip().split(".")
        node = cfg
        for t in tables:
            node = node.setdefault(t, {})
        node[leaf] = toml_value(value.strip())
    return cfg


def toml_dump(settings: dict[str, Any]) -> str:
    """Flat keys, then one-level tables; values as JSON, which TOML accepts for strings, numbers and arrays."""

    def val(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = [f"{k} = {val(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for k, table in settings.items():
        if isinstance(table, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {val(vv)}" for kk, vv in table.items()]
    return "\n".join(lines) + "\n"


JOURNAL_DUMP = """
import json, sys
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
study = optuna.load_study(study_name=sys.argv[2], storage=JournalStorage(JournalFileBackend(sys.argv[1])))
out = []
for t in study.trials:
    a = t.user_attrs
    out.append({"index": a.get("index", t.number + 1), "state": t.state.name, "refusals": a.get("refusals"),
                "n_bad_prompts": a.get("n_bad_prompts"), "base_refusals": a.get("base_refusals"),
                "kl": a.get("kl_divergence"), "params": t.params,
                "seconds": None if t.datetime_complete is None or t.datetime_start is None
                else (t.datetime_complete - t.datetime_start).total_seconds()})
print(json.dumps(out))
"""


def journal_trials(venv: Path, run_dir: Path, study: str) -> list[dict[str, Any]]:
    """Every trial of the tool's Optuna journal (``run_dir/checkpoints/*.jsonl``), read with the venv's optuna."""
    journal = next((run_dir / "checkpoints").glob("*.jsonl"))
    cmd = [str(venv / "bin" / "python"), "-c", JOURNAL_DUMP, str(journal), study]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def pareto(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed trials by refusals then KL, keeping each one that lowers the KL seen so far (heretic's menu order)."""
    done = [t for t in trials if t["state"] == "COMPLETE" and t["refusals"] is not None and t["kl"] is not None]
    front, best = [], float("inf")
    for t in sorted(done, key=lambda t: (t["refusals"], t["kl"])):
        if t["kl"] < best:
            best = t["kl"]
            front.append(t)
    return front


def run_abliterix(model: str, files: dict[str, Path], work: Path, args: Any) -> dict[str, Any]:
    """abliterix 1.12.2, ``--non-interactive`` with an output folder: it exports its fewest-refusals trial.

    ``abliterix.toml`` sets the model, trials, ``max_gen_tokens``, sampler seed, ``system_prompt``
    (``args.system_prompt``, the template's default: its prompts read as with no system message) and the four
    prompt folders (the bundled TRAIN split for the steering vectors, VAL for its scoring); everything else is
    abliterix's default,
    ``--abliterix-set TABLE.KEY=VALUE`` overrides any key.
    """
    venv = args.abliterix_venv
    exe = setup_venv(venv, ABLITERIX, "abliterix")
    run_dir = work / "abliterix"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists (abliterix would resume its study); remove it or change --work")
    run_dir.mkdir(parents=True)

    def source(key: str) -> dict[str, str]:
        return {"dataset": str(files[f"{key}_dir"]), "split": "train", "column": "text"}

    cfg = {
        "seed": args.seed,
        "system_prompt": args.system_prompt,
        "model": {"model_id": model},
        "inference": {"max_gen_tokens": args.max_response_length},
        "optimization": {"num_trials": args.abliterix_trials, "sampler_seed": args.seed},
        "benign_prompts": source("harmless_train"),
        "target_prompts": source("harmful_train"),
        "benign_eval_prompts": source("harmless_val"),
        "target_eval_prompts": source("harmful_val"),
    }
    (run_dir / "abliterix.toml").write_text(toml_dump(apply_overrides(cfg, args.abliterix_set)))
    out = run_dir / "model"
    t0 = time.perf_counter()
    with (run_dir / "abliterix.log").open("w") as log:
        cmd = [str(exe), "--non-interactive", "--non-interactive-output-dir", str(out)]
        proc = subprocess.run(cmd, cwd=run_dir, env=offline_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not (out / "config.json").exists():
        raise SystemExit(f"abliterix failed (rc {proc.returncode}); see {run_dir / 'abliterix.log'}")
    trials = journal_trials(venv, run_dir, "abliterix")
    done = [t for t in trials if t["state"] == "COMPLETE"]
    pick = min(done, key=lambda t: (t["refusals"], t["kl"]))
    n_eval = len(bundled("harmful", "val"))
    for t in trials:
        t["n_bad_prompts"] = t["n_bad_prompts"] or n_eval
    return {"wall_s": round(wall, 1), "trials": trials, "front": pareto(trials), "pick": pick, "model": str(out)}
