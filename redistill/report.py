"""What every results page shares: Markdown tables, one timestamp format, the machine line and hand remarks.

A page states what its run files say; judgement that does not follow from the figures lives in a
hand-written remarks file that the page includes under its own heading (``remarks_section``).
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from redistill.errors import UserError

#: the one timestamp format of results files: UTC, seconds, ISO 8601 with a Z
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

REMARKS_HEADING = "## Remarks (written by hand after looking at the results; the rest of the page is generated)"


def timestamp(when: Optional[datetime] = None) -> str:
    """``when`` (default: now) as UTC in ``TIME_FORMAT``, e.g. 2026-11-22T02:39:45Z."""
    when = datetime.now(timezone.utc) if when is None else when.astimezone(timezone.utc)
    return when.strftime(TIME_FORMAT)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine(**versions: str) -> Dict[str, Any]:
    """This machine as a record for a results file: cores, CPU, OS, GPU (None: none), Python, and ``versions``."""
    return {"cores": os.cpu_count(), "cpu": cpu_model(), "os": platform.platform(), "gpu": _gpu(),
            "python": platform.python_version(), **versions}


def machine_line(m: Union[Dict[str, Any], str, None] = None) -> str:
    """One line for a page: a stored ``machine()`` record (default: this machine), or a stored line as it is.

    Records written before this format (``platform`` for ``os``, no ``gpu`` key) are read too.
    """
    if isinstance(m, str):
        return m
    m = machine() if m is None else m
    parts = [f"{m.get('cores')} cores ({m.get('cpu')})", str(m.get("os") or m.get("platform"))]
    if "gpu" in m:
        parts.append(m["gpu"] or "no GPU")
    parts.append(f"Python {m.get('python')}")
    known = {"cores", "cpu", "os", "platform", "gpu", "python"}
    parts += [f"{k} {v}" for k, v in m.items() if k not in known]
    return ", ".join(parts)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    """A Markdown table as lines: the header, the rule, one line per row (cells formatted by the caller)."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def remarks_section(path: Union[str, os.PathLike, None]) -> List[str]:
    """The page lines of a hand-written remarks file (none without a path)."""
    if not path:
        return []
    if not Path(path).is_file():
        raise UserError(f"--remarks {path} not found: give the hand-written remarks file (Markdown)")
    return ["", REMARKS_HEADING, "", Path(path).read_text().strip()]


def add_page_options(parser, rewrites_from: str, remarks: bool = True) -> None:
    """The options every results writer shares: ``--pages-only`` (run nothing, rewrite the page from
    ``rewrites_from``, the run files kept beside it) and, where a page takes judgement, ``--remarks FILE``."""
    g = parser.add_argument_group("results page")
    if remarks:
        g.add_argument("--remarks", default=None, metavar="FILE",
                       help="a Markdown file of remarks written by hand after looking at the results, added to the "
                            "page under its own heading (the rest of the page is generated)")
    g.add_argument("--pages-only", action="store_true", help=f"run nothing: rewrite the page from {rewrites_from}")
