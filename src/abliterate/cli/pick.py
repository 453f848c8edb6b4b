"""The interactive part of ``run``'s search: on a terminal, show the Pareto front and let the user type the
trial to keep, waiting at most ``--pick-wait`` seconds before keeping the default policy's pick."""

from __future__ import annotations

import select
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from rich.markup import escape
from rich.table import Table

from abliterate.cli.common import err, paused_bars
from abliterate.edit.spec import EditSpec
from abliterate.select.search import Pick, TrialRecord


def asks(stdin: TextIO, shown_on: TextIO, wait: float, trial: int | None, json_output: bool) -> bool:
    """Whether ``run`` offers the prompt: the answer comes from a terminal and the front and prompt (``shown_on``,
    standard error) go to one, a wait is set, no --trial, no --json."""
    return wait > 0 and trial is None and not json_output and stdin.isatty() and shown_on.isatty()


def front_table(front: Sequence[TrialRecord], default: TrialRecord) -> Table:
    table = Table(title="Pareto front (validation prompts)", title_justify="left")
    for name in ("trial", "refusal score", "judged failures", "KL", "answer KL", "edit"):
        table.add_column(name, justify="left" if name == "edit" else "right")
    for r in front:
        judged = f"{r.failures}/{r.judged}" if r.failures is not None else "–"
        answer = f"{r.answer_kl:.4f}" if r.answer_kl is not None else "–"
        mark = " *" if r.number == default.number else ""
        label = EditSpec.from_dict(r.spec).label()
        table.add_row(f"{r.number}{mark}", f"{r.refusal:.2f}", judged, f"{r.kl:.4f}", answer, escape(label))
    return table


def _read_line(stream: TextIO, seconds: float) -> str | None:
    """A line typed within ``seconds`` (without its newline), '' at end of input, None on timeout."""
    ready, _, _ = select.select([stream], [], [], max(seconds, 0.0))
    if not ready:
        return None
    line = stream.readline()
    return line.rstrip("\r\n") if line else ""


def terminal_pick(wait: float, stream: TextIO | None = None) -> Pick:
    """A :data:`abliterate.select.search.Pick` that asks on the terminal: Enter (or end of input, or no answer within
    ``wait`` seconds) keeps the default; a number must be a trial on the front, else it asks again."""

    def pick(front: Sequence[TrialRecord], default: TrialRecord, note: str) -> int | None:
        source = stream or sys.stdin
        on_front = {r.number for r in front}
        console = err()
        with paused_bars():
            console.print(front_table(front, default))
            console.print(f"default ([bold]*[/]): {escape(note)}", highlight=False)
            deadline = time.monotonic() + wait
            while True:
                left = deadline - time.monotonic()
                console.print(
                    f"Trial to keep [Enter: {default.number}; keeps it by itself in {max(left, 0):.0f} s]: ",
                    end="",
                    markup=False,
                    highlight=False,
                )
                answer = _read_line(source, left)
                if answer is None:
                    console.print(f"\nno answer in {wait:g} s; keeping trial {default.number}", highlight=False)
                    return None
                answer = answer.strip()
                if not answer:
                    return None
                if answer.isdigit() and int(answer) in on_front:
                    return int(answer)
                console.print(
                    f"{escape(answer)!s} is not a trial on the front; type one of {sorted(on_front)}", highlight=False
                )

    return pick


def pick_for(cfg: Any, json_output: bool) -> Pick | None:
    """The prompt for ``run`` when it should be offered (see :func:`asks`), else None."""
    sc = cfg.search
    if not sc.enabled or not asks(sys.stdin, sys.stderr, sc.pick_wait, sc.trial, json_output):
        return None
    return terminal_pick(sc.pick_wait)
