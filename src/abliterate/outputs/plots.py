"""Plot plumbing shared by the HTML reports (:mod:`abliterate.outputs.report`, :mod:`abliterate.outputs.report_search`):
matplotlib without a display, a figure saved as a PNG, a PNG embedded in HTML."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, never a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def img_tag(path: Path) -> str:
    """An ``<img>`` holding the PNG at ``path`` inline (the report is one self-contained file)."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'
