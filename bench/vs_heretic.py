"""Head-to-head on one model: abliterate's search vs heretic 1.4.0 (and abliterix 1.12.2), judged by heldout.py.

    python bench/vs_heretic.py [--work DIR] [--heretic-trials N] [--ours "FLAGS"] [--heretic-save lowest|all|K]
        [--heretic-set KEY=TOML_VALUE ...] [--abliterix-trials N] [--abliterix-set TABLE.KEY=TOML_VALUE ...]
        [--max-response-length 48] [--seed 0] [--skip-ours] [--skip-heretic] [--no-evaluate] [--no-judge]
        [--judge-args "FLAGS"] [--no-judge-base] [--model DIR] [--heretic-venv DIR] [--abliterix-venv DIR]

Full comparison (what issue 11 asks; hours on this 2-core CPU: heretic ~76 s per trial here, the judge a few
minutes per model; run it under ``nice`` with nothing else heavy on the machine)::

    python bench/vs_heretic.py --work /tmp/vs --heretic-trials 40 --heretic-save all \
        --abliterix-trials 15 --ours "--trials 60"

then give ``--ours`` a ``--timeout`` of at most a quarter of heretic's wall time (``summary.json`` ->
``heretic.wall_s``) if the trial count alone does not keep it there; the table prints both wall times.
Smoke run of the harness (what BENCHMARKS.md records: heretic 1 trial on 64+64 train and 16+16 evaluation prompts,
its response-prefix check skipped, a small abliterate run, the judge on 16+16 prompts)::

    python bench/vs_heretic.py --work /tmp/vs-small --heretic-trials 1 --heretic-set batch_size=16 \
        --heretic-set 'response_prefix=""' --heretic-set 'bad_prompts.split="[:64]"' \
        --heretic-set 'good_prompts.split="[:64]"' --heretic-set 'bad_evaluation_prompts.split="[:16]"' \
        --heretic-set 'good_evaluation_prompts.split="[:16]"' --ours "--n-train 16 --n-val 8 --n-test 8" \
        --no-judge-base --judge-args "--limit 16"

``--model DIR`` picks the model (default: the demo model; the second model of issue 23 is
``--model "$(python bench/second_model.py | tail -1)"``). One command per tool, same ``--work``::

    python bench/vs_heretic.py --model M --work W --heretic-trials 40 --skip-ours --no-judge
    python bench/vs_heretic.py --model M --work W --skip-heretic --abliterix-trials 15 --skip-ours --no-judge
    python bench/vs_heretic.py --model M --work W --skip-heretic            # ours, then the judge on every pick

Fairness (issue 23, point 8): every tool optimizes, and the judge judges, on the same prompt text. abliterate and
heldout.py send no system message (the template's default applies); heretic always sends one, so its
``system_prompt`` is set to the text that renders exactly as none (``peers.template_default_system``: for Qwen2.5
its default "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", not heretic's own "You are a
helpful assistant."), and abliterix's likewise. Where no text renders as none (a template without a system role),
the script says so in one line and records ``system_prompt.matched: false`` in ``summary.json``. Every pick is
judged by heldout.py's one verdict function (``judge_responses`` with the refusal profile's judge: degenerate
answers apart, think blocks removed), with first-token KL and answer KL. Wall times are measured by this script
around each tool's command, one tool at a time; ``summary.json`` records the CPUs this process may use and
the load average before each tool, so a contended run shows.

What it does, in ``--work`` (default ``/tmp/vs_heretic``):

1. ``prompts/``: the bundled TRAIN split written as ``harmful_train.txt`` / ``harmless_train.txt`` (heretic's
   ``bad_prompts`` / ``good_prompts``, from which it computes directions) and the bundled VAL split as
   ``harmful_val.txt`` / ``harmless_val.txt`` (heretic's evaluation prompts, on which it scores trials); the same
   again as folders ``KIND_SPLIT/train.jsonl`` for abliterix. abliterate draws its train/validation prompts from
   the same two splits. The TEST split is left to the judge.
2. heretic: a virtual environment (``--heretic-venv``, default ``/tmp/heretic-venv``; made with
   ``python3 -m venv --system-site-packages`` so it reuses the installed torch, then ``pip install heretic-llm==1.4.0``,
   which brings its own pinned transformers/optuna/peft). ``heretic/config.toml`` sets: model, ``n_trials``,
   ``max_response_length`` (default 48, the judge's and abliterate's ``max_new_tokens``), ``seed``,
   ``export_strategy = "merge"`` and the four prompt files; everything else is heretic's default, including its
   automatic batch size and its response-prefix check (200 generations), which on this CPU cost many minutes
   before the first trial and count in its wall time (``--heretic-set``
   overrides any key, e.g. ``--heretic-set batch_size=16``). It runs offline (``HF_HUB_OFFLINE=1``) in a
   pseudo-terminal (pexpect) because its menus need one; when the Pareto menu appears the driver picks trials
   (``--heretic-save lowest``: the first entry, fewest refusals; ``all``: every Pareto trial; ``K``: the K-th
   entry, 0-based), chooses "Save the model to a local folder" and types ``heretic/model-trialN``. The full
   terminal log is ``heretic/heretic.log``; every trial (refusals, KL on its own prompts) is read from its Optuna
   journal (``heretic/checkpoints/*.jsonl``) with the venv's optuna. Wall time: spawn to the Pareto menu.
3. abliterix (``--abliterix-trials N`` > 0): its own venv likewise, ``abliterix --non-interactive
   --non-interactive-output-dir abliterix/model`` with ``abliterix/abliterix.toml`` (model, ``num_trials``,
   ``max_gen_tokens``, seeds, the four prompt folders; see ``peers.run_abliterix``); it exports its
   fewest-refusals trial. Wall time: the whole command.
4. ours: ``python -m abliterate.cli run MODEL --out ours/model --seed SEED`` plus ``--ours`` flags; wall time of the
   whole command; trials and front read from ``ours/model/metrics.json``.
5. cross-check: ``heretic --evaluate-model M`` on every saved model (heretic's own metric, its own prompts =
   the VAL files, its refusal markers, its system prompt) unless ``--no-evaluate``.
6. judge: ``bench/heldout.py`` on the unedited model and every saved model (one process; ``--judge-args`` passes
   flags through) unless ``--no-judge``.

Results: ``summary.json`` and a markdown table on stdout. Neither heretic's code nor abliterix's is copied here
(both AGPL); they are only run as programs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import add_model_option, model_path
from peers import (
    apply_overrides,
    journal_trials,
    offline_env,
    pareto,
    run_abliterix,
    setup_venv,
    template_default_system,
    toml_dump,
    write_prompts,
)

HERETIC = "heretic-llm==1.4.0"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\r")
DOWN = "\x1b[B"
BENCH = Path(__file__).resolve().parent


def heretic_config(model: str, files: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": model,
        "n_trials": args.heretic_trials,
        "max_response_length": args.max_response_length,
        "seed": args.seed,
        "export_strategy": "merge",
        "system_prompt": args.system_prompt,
        "good_prompts": {"dataset": str(files["harmless_train"])},
        "bad_prompts": {"dataset": str(files["harmful_train"])},
        "good_evaluation_prompts": {"dataset": str(files["harmless_val"])},
        "bad_evaluation_prompts": {"dataset": str(files["harmful_val"])},
    }
    return apply_overrides(cfg, args.heretic_set)


def run_heretic(exe: Path, run_dir: Path, args: argparse.Namespace, log: Any) -> tuple[list[str], float]:
    """Drive heretic's menus in a pseudo-terminal; returns the saved model directories and the search wall time."""
    import pexpect

    child = pexpect.spawn(
        str(exe), cwd=str(run_dir), env=offline_env(), encoding="utf-8", dimensions=(60, 220), timeout=None
    )
    child.logfile_read = log
    t0 = time.perf_counter()
    child.expect("Which trial do you want to use")
    wall = time.perf_counter() - t0
    front = pareto(journal_trials(exe.parent.parent, run_dir, "heretic"))
    wanted = {"lowest": [0], "all": list(range(len(front)))}.get(args.heretic_save)
    picks = wanted if wanted is not None else [int(args.heretic_save)]
    saved = []
    for i, k in enumerate(picks):
        if i > 0:
            child.expect("Which trial do you want to use")
        child.send(DOWN * k + "\r")
        child.expect("What do you want to do with the decensored model")
        child.send("\r")  # "Save the model to a local folder"
        child.expect("Path to the folder")
        target = run_dir / f"model-trial{front[k]['index']}"
        child.send(f"{target}\r")
        child.expect("What do you want to do with the decensored model")
        if not (target / "config.json").exists():
            raise SystemExit(f"heretic did not save {target}; see {log.name}")
        saved.append(str(target))
        child.send(DOWN * 4 + "\r")  # "Return to the trial selection menu"
    child.expect("Which trial do you want to use")
    child.terminate(force=True)
    return saved, wall


def heretic_evaluate(exe: Path, run_dir: Path, base: str, model: str, log_path: Path) -> dict[str, Any]:
    """``heretic --evaluate-model`` in a fresh folder with the search's config (its prompts, markers, system prompt).

    ``--model`` is passed explicitly: without it heretic takes a trailing non-flag argument for the model and
    inserts ``--model`` before it, which breaks ``--evaluate-model PATH``.
    """
    eval_dir = log_path.parent
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "config.toml").write_text((run_dir / "config.toml").read_text())
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(exe), "--evaluate-model", model, "--model", base],
        cwd=eval_dir,
        env=offline_env(),
        capture_output=True,
        text=True,
    )
    text = ANSI.sub("", proc.stdout + proc.stderr)
    log_path.write_text(text)
    kl = re.findall(r"KL divergence: ([0-9.]+)", text)
    ref = re.findall(r"\* Refusals: (\d+)/(\d+)", text)
    initial = re.findall(r"Initial refusals: (\d+)/(\d+)", text)
    return {
        "model": model,
        "rc": proc.returncode,
        "kl": float(kl[-1]) if kl else None,
        "refusals": f"{ref[-1][0]}/{ref[-1][1]}" if ref else None,
        "base_refusals": f"{initial[-1][0]}/{initial[-1][1]}" if initial else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "log": str(log_path),
    }


def run_ours(model: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "abliterate.cli", "run", model, "--out", str(out), "--seed", str(args.seed)]
    cmd += shlex.split(args.ours) + (["--force"] if out.exists() else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (out.parent / "ours.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"abliterate run failed (rc {proc.returncode}); see {out.parent / 'ours.log'}")
    metrics = json.loads((out / "metrics.json").read_text())
    search = metrics.get("search") or {}
    return {
        "command": shlex.join(cmd),
        "wall_s": round(wall, 1),
        "model": str(out),
        "trials": len(search.get("trials") or []) or None,
        "front": search.get("front"),
        "chosen": search.get("chosen"),
        "search_s": search.get("seconds"),
        "timings_s": metrics.get("timings_s"),
    }


def judge(models: list[tuple[str, str]], base: str, work: Path, extra: str) -> list[dict[str, Any]]:
    jsonl = work / "heldout.jsonl"
    jsonl.unlink(missing_ok=True)
    cmd = [sys.executable, str(BENCH / "heldout.py"), *[m for m, _ in models], "--base", base, "--jsonl", str(jsonl)]
    cmd += [x for _, label in models for x in ("--label", label)] + ["--responses", str(work / "responses")]
    cmd += shlex.split(extra)
    subprocess.run(cmd, check=True)
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_option(ap)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vs_heretic"))
    ap.add_argument("--heretic-venv", type=Path, default=Path("/tmp/heretic-venv"))
    ap.add_argument("--heretic-trials", type=int, default=2)
    ap.add_argument("--heretic-save", default="lowest", help="lowest, all, or a 0-based index into its Pareto menu")
    ap.add_argument("--heretic-set", action="append", default=[], help="KEY=TOML_VALUE for heretic's config.toml")
    ap.add_argument("--abliterix-trials", type=int, default=0, help="run abliterix 1.12.2 too (0: skip)")
    ap.add_argument("--abliterix-venv", type=Path, default=Path("/tmp/abliterix-venv"))
    ap.add_argument("--abliterix-set", action="append", default=[], help="TABLE.KEY=TOML_VALUE for abliterix.toml")
    ap.add_argument("--max-response-length", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours", default="", help="extra flags for 'abliterate run', e.g. \"--trials 60\"")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-heretic", action="store_true")
    ap.add_argument("--no-evaluate", action="store_true", help="skip heretic --evaluate-model cross-checks")
    ap.add_argument("--no-judge", action="store_true", help="skip bench/heldout.py")
    ap.add_argument("--judge-args", default="", help="extra flags for bench/heldout.py")
    ap.add_argument("--no-judge-base", action="store_true", help="do not judge the unedited model again")
    args = ap.parse_args()
    args.model = model_path(args.model)
    default_system = template_default_system(args.model)
    args.system_prompt = default_system or ""
    if default_system is None:
        print(
            "# warning: no system text renders this model's template as no system message; heretic's prompts will "
            "carry an empty system message that abliterate's and the judge's do not",
            file=sys.stderr,
        )
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    files = write_prompts(work / "prompts")
    # a rerun in the same --work (e.g. --skip-heretic with a new --ours) keeps the earlier tools' results
    old = json.loads((work / "summary.json").read_text()) if (work / "summary.json").exists() else {}
    summary: dict[str, Any] = old | {"model": args.model, "args": vars(args) | {"work": str(work)}}
    summary["system_prompt"] = {
        "peers": args.system_prompt,
        "ours_and_judge": None,
        "matched": default_system is not None,
    }
    summary.setdefault("machine", {})["cpus"] = len(os.sched_getaffinity(0))
    models: list[tuple[str, str]] = []

    def save() -> None:
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    run_dir = work / "heretic"
    need_heretic = not args.skip_heretic or (not args.no_evaluate and (run_dir / "config.toml").exists())
    exe = setup_venv(args.heretic_venv, HERETIC, "heretic") if need_heretic else args.heretic_venv / "bin" / "heretic"
    if not args.skip_heretic:
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists (heretic would offer to resume its study); remove it or change --work")
        run_dir.mkdir()
        (run_dir / "config.toml").write_text(toml_dump(heretic_config(args.model, files, args)))
        summary["machine"]["load_before_heretic"] = os.getloadavg()
        with (run_dir / "heretic.log").open("w") as log:
            saved, wall = run_heretic(exe, run_dir, args, log)
        trials = journal_trials(args.heretic_venv, run_dir, "heretic")
        summary["heretic"] = {"wall_s": round(wall, 1), "trials": trials, "front": pareto(trials), "saved": saved}
        models += [(m, f"heretic {Path(m).name}") for m in saved]
        save()
    elif "heretic" in summary:  # saved by an earlier run in this --work: cross-check and judge them too
        models += [(m, f"heretic {Path(m).name}") for m in summary["heretic"]["saved"]]
    if args.abliterix_trials > 0:
        summary["machine"]["load_before_abliterix"] = os.getloadavg()
        summary["abliterix"] = run_abliterix(args.model, files, work, args)
        models.append((summary["abliterix"]["model"], "abliterix"))
        save()
    elif "abliterix" in summary:  # run earlier in this --work: judged with the others
        models.append((summary["abliterix"]["model"], "abliterix"))
    if not args.skip_ours:
        summary["machine"]["load_before_ours"] = os.getloadavg()
        summary["ours"] = run_ours(args.model, work / "ours" / "model", args)
        models.append((summary["ours"]["model"], "abliterate"))
        save()
    elif "ours" in summary:
        models.append((summary["ours"]["model"], "abliterate"))
    if not args.no_evaluate and (run_dir / "config.toml").exists():
        summary["heretic_evaluate"] = merge(
            summary.get("heretic_evaluate", []),
            [
                heretic_evaluate(
                    exe, run_dir, args.model, m, work / "heretic-eval" / "_".join(Path(m).parts[-2:]) / "evaluate.log"
                )
                for m, _ in models
            ],
        )
        save()
    if not args.no_judge:
        base = [] if args.no_judge_base else [(args.model, "unedited")]
        if base or models:
            summary["heldout"] = merge(
                summary.get("heldout", []), judge([*base, *models], args.model, work, args.judge_args)
            )
            save()
    print_table(summary)


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-model records: the new ones, and the old ones of models not measured again."""
    fresh = {r["model"] for r in new}
    return [r for r in old if r["model"] not in fresh] + new


def print_table(summary: dict[str, Any]) -> None:
    """One row per judged model: the tool's trials and wall time, its own view of its pick, the judge's numbers."""
    held = {r["model"]: r for r in summary.get("heldout", [])}
    cross = {r["model"]: r for r in summary.get("heretic_evaluate", [])}
    cols = ["model", "trials", "wall time", "its own pick (its prompts)", "held-out refusals", "degenerate"]
    cols += ["first-token KL", "answer KL"]
    print("\n| " + " | ".join([*cols, "heretic's metric"]) + " |")
    print("|" + "---|" * (len(cols) + 1))
    rows: list[tuple[str, str, str, str, float | None]] = [(summary["model"], "unedited", "-", "-", None)]

    def own(t: dict[str, Any]) -> str:
        return f"trial {t['index']}: {t['refusals']}/{t['n_bad_prompts']} @ {t['kl']:.4f}"

    if "heretic" in summary:
        h = summary["heretic"]
        front = {f"model-trial{t['index']}": t for t in h["front"]}
        for m in h["saved"]:
            rows.append(
                (m, f"heretic 1.4.0 {Path(m).name}", str(len(h["trials"])), own(front[Path(m).name]), h["wall_s"])
            )
    if "abliterix" in summary:
        a = summary["abliterix"]
        rows.append((a["model"], "abliterix 1.12.2", str(len(a["trials"])), own(a["pick"]), a["wall_s"]))
    if "ours" in summary:
        o = summary["ours"]
        rows.append((o["model"], "abliterate", str(o["trials"]), f"trial {o['chosen']}", o["wall_s"]))
    for model, label, n, pick, wall in rows:
        j, c = held.get(model), cross.get(model)
        ref = f"{j['refusals']}/{j['n_harmful']}" if j else "-"
        deg = f"{j['degenerate']}/{j['n_harmful']}" if j else "-"
        kl = f"{j['kl_mean']:.4f} | {j['answer_kl_mean']:.4f}" if j else "- | -"
        hm = f"{c['refusals']} @ {c['kl']}" if c and c["kl"] is not None else "-"
        w = "-" if wall is None else f"{wall:.0f} s"
        print(f"| {label} | {n} | {w} | {pick} | {ref} | {deg} | {kl} | {hm} |")


if __name__ == "__main__":
    main()
