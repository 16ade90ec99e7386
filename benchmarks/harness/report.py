"""What the benchmarks write: the environment header, Markdown tables and cell texts, the report file rewritten
after every section, JSON records, and the figure helpers (matplotlib, Agg backend, optional)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .memory import MIB
from .runner import REPO_ROOT
from .timing import gemm_floor_flops

# ------------------------------------------------------------------------------------------------- text


def parse_csv(text: str, cast: Callable = str) -> list:
    """``"1,0.5, 0.2"`` → ``[cast("1"), cast("0.5"), cast("0.2")]`` (empty items dropped)."""
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def markdown_table(rows: Iterable[Dict[str, object]], columns: Sequence[str],
                   headers: Optional[Sequence[str]] = None) -> str:
    """A Markdown table of ``rows`` (dicts) in ``columns`` order; missing entries print as ``–``."""
    headers = list(headers) if headers is not None else list(columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "–")
            cells.append(("–" if value is None else str(value)).replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def fmt_mib(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "–"
    mib = nbytes / MIB
    if mib >= 10240:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


def fmt_pct(x: Optional[float]) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def cell_text(res: Optional[dict], floor_s: Optional[float] = None) -> str:
    """``time (fraction of the floor) +peak`` of a result ``{"time", "peak"}``, or its ``text``; ``–`` for None."""
    if res is None:
        return "–"
    if "text" in res:
        return res["text"]
    parts = [fmt_ms(res["time"])]
    if floor_s:
        parts.append(f"({fmt_pct(floor_s / res['time'])})")
    if res.get("peak") is not None:
        parts.append(f"+{fmt_mib(res['peak'])}")
    return " ".join(parts)


def ratio_rows(records: List[dict], rate_tflops: Optional[float], d_s: int, d_t: int, vocab: int, *,
               time_key: str = "time", peak_key: str = "peak") -> List[dict]:
    """Rows of a loss step against the retention ratio: ``rule``, ``ratio``, ``tokens``, ``time``, ``vs 1.0`` (over
    the same rule's ratio-1.0 step), ``ideal`` (the GEMM floor's ratio), ``of floor``, ``peak``. A record has
    rule, ratio, n, selected and either ``time_key``/``peak_key`` or ``text``."""
    base = {r["rule"]: r[time_key] for r in records if r.get(time_key) and r["ratio"] == 1.0}
    full = gemm_floor_flops(1, 1, d_s, d_t, 1.0, "step")
    rows = []
    for r in records:
        row = {"rule": r["rule"], "ratio": f"{r['ratio']:g}",
               "tokens": f"{r.get('selected', '–')}/{r.get('n', '–')}"}
        seconds = r.get(time_key)
        if seconds is None:
            row["time"] = r.get("text", "–")
            rows.append(row)
            continue
        b = base.get(r["rule"])
        row.update({"time": fmt_ms(seconds), "peak": fmt_mib(r.get(peak_key)),
                    "vs 1.0": f"{seconds / b:.2f}" if b else "–",
                    "ideal": f"{gemm_floor_flops(1, 1, d_s, d_t, r['ratio'], 'step') / full:.2f}"
                    if r["rule"] != "none" else "–"})
        if rate_tflops:
            floor_s = gemm_floor_flops(r["n"], vocab, d_s, d_t, r["ratio"], "step") / (rate_tflops * 1e12)
            row["of floor"] = fmt_pct(floor_s / seconds)
        rows.append(row)
    return rows


def grid_table(results: Dict[tuple, dict], phase: str, names: Sequence[str], ns: Sequence[int], vs: Sequence[int],
               floor_flops: Callable[[int, int], float], rate_tflops: Optional[float],
               ratio_of: Optional[tuple] = None) -> str:
    """A table of one phase over a (V, N) grid: rows (V, N, the GEMM floor), a column per variant name, each cell
    :func:`cell_text` of ``results[(name, phase, n, v)]``; ``ratio_of=(a, b)`` adds the column ``b/a`` of times."""
    rows = []
    for v in vs:
        for n in ns:
            flops = floor_flops(n, v)
            floor_s = flops / (rate_tflops * 1e12) if rate_tflops else None
            row = {"V": v, "N": n, "floor": fmt_ms(floor_s) if floor_s else f"{flops / 1e12:.2f} TFLOP"}
            row.update({name: cell_text(results.get((name, phase, n, v)), floor_s) for name in names})
            if ratio_of:
                a, b = (results.get((x, phase, n, v)) or {} for x in ratio_of)
                if a.get("time") and b.get("time"):
                    row["/".join(ratio_of[::-1])] = f"{b['time'] / a['time']:.2f}×"
            rows.append(row)
    return markdown_table(rows, ["V", "N", "floor"] + list(names) + (["/".join(ratio_of[::-1])] if ratio_of else []))


RATIO_COLUMNS = ["rule", "ratio", "tokens", "time", "vs 1.0", "ideal", "of floor", "peak"]


# ------------------------------------------------------------------------------------------------- environment


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    s = re.sub(r"\(.*?\)", "", text)
    s = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
    return s or "device"


def _first_line_of(cmd: Sequence[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            return (out.stdout.strip().splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _git_commit() -> str:
    commit = _first_line_of(["git", "rev-parse", "--short", "HEAD"], REPO_ROOT)
    if not commit:
        return "unknown"
    dirty = _first_line_of(["git", "status", "--porcelain", "--untracked-files=no"], REPO_ROOT)
    return commit + (" (with local changes)" if dirty else "")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)


def env_header(device) -> List[tuple]:
    """(key, value) pairs describing the run: device, driver/CUDA, versions, the command, the date, the commit."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken triton is itself the information
        triton_version = "not importable"
    rows = [("device", device_name(device))]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _first_line_of(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "unknown"
        rows += [
            ("driver / CUDA (torch)", f"{driver} / {torch.version.cuda}"),
            ("SMs / memory", f"{props.multi_processor_count} / {props.total_memory / 2**30:.1f} GiB"),
        ]
    rows += [
        ("torch / triton", f"{torch.__version__} / {triton_version}"),
        ("python", platform.python_version()),
        ("host threads", str(torch.get_num_threads())),
        ("commit", _git_commit()),
        ("command", f"`{command_line()}`"),
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
    ]
    return rows


def env_markdown(device) -> str:
    return markdown_table([{"key": k, "value": v} for k, v in env_header(device)], ["key", "value"])


# ------------------------------------------------------------------------------------------------- files


def write_text(path: Optional[str], text: str) -> None:
    """Write ``text`` to ``path`` (its folder created); nothing when ``path`` is None."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def write_json(path: Optional[str], obj) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


class Report:
    """A Markdown report: sections in order, rewritten to disk (atomically) after every change, so a run cut
    short still leaves its file."""

    def __init__(self, path: str, title: str, header: str):
        self.path = path
        self.title = title
        self.header = header
        self.sections: Dict[str, str] = {}

    def set(self, key: str, text: str) -> None:
        self.sections[key] = text
        self.write()

    def text(self) -> str:
        return "\n\n".join([f"# {self.title}", self.header] + list(self.sections.values())) + "\n"

    def write(self) -> None:
        write_text(self.path + ".tmp", self.text())
        os.replace(self.path + ".tmp", self.path)


# ------------------------------------------------------------------------------------------------- figures


def pyplot():
    """matplotlib.pyplot on the Agg backend (ImportError where matplotlib is absent: figures are optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style_axis(ax, xlabel: str, ylabel: str, *, title: Optional[str] = None, xticks=None, log_x: bool = False,
               log_y: bool = False, invert_x: bool = False, from_zero: bool = False) -> None:
    """Labels, grid and legend of one axis, the way every benchmark figure draws them."""
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if xticks is not None:
        ax.set_xticks(list(xticks))
    if from_zero:
        ax.set_ylim(bottom=0)
    if invert_x:
        ax.invert_xaxis()
    ax.grid(alpha=0.3, which="both" if log_x or log_y else "major")
    ax.legend(fontsize=8)


def save_figure(fig, path: str, dpi: int = 72) -> None:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
