"""Draw the Grafana dashboard from recorded ``/metrics`` scrapes, without a Grafana.

    .venv/bin/python docs/tools/render_dashboard.py \\
        --scrapes docs/img/dashboard-scrapes.txt.gz --out docs/img/dashboard.png

Reads ``etc/grafana/sparkytwist.json`` and a scrape file written by ``scrape_demo.py``
(blocks of Prometheus text, each headed ``# SCRAPE <unix time> healthz=<status>``),
evaluates every panel's PromQL at every scrape and draws the panels where the
dashboard's ``gridPos`` puts them, with their titles, units, legends and series colours.

Only the PromQL the dashboard uses is understood: selectors with ``= != =~ !~`` matchers,
``rate``/``irate``/``increase`` over a range, ``sum|max|min|avg [by|without (...)]``,
arithmetic with a number, and ``== N``-style filters. ``$job`` and ``$instance`` match
everything; each scrape gets ``job="sparkytwist"`` and ``instance="demo"``. The healthz
status becomes ``probe_success{job="sparkytwist-healthz"}``, as a blackbox probe would.

A demo run lasts a minute, so range windows are capped (``--max-window``, 10 s): ``rate``
is the average over the capped window, and ``increase(x[1m])`` is that rate times 60 s,
which is what Prometheus gives for a steady rate.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]


# -- the scrapes ------------------------------------------------------------------------


@dataclass
class Store:
    times: list[float]
    #: series name -> labels -> {scrape index: value}
    series: dict[str, dict[Labels, dict[int, float]]]
    health: list[int]
    recorded_by: str  #: the command that recorded the scrapes


def load_scrapes(path: Path) -> Store:
    from prometheus_client.parser import text_string_to_metric_families

    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    store = Store([], {}, [], "")
    recorded = re.match(r"# RECORDED-BY (.*)", text)
    if recorded:
        store.recorded_by = recorded.group(1)
    for block in text.split("# SCRAPE ")[1:]:
        head, _, body = block.partition("\n")
        fields = head.split()
        index = len(store.times)
        store.times.append(float(fields[0]))
        health = dict(f.split("=", 1) for f in fields[1:]).get("healthz", "0")
        store.health.append(int(health))
        body = body.split("# END", 1)[0]
        extra = {"job": "sparkytwist", "instance": "demo"}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                labels = frozenset({**sample.labels, **extra}.items())
                store.series.setdefault(sample.name, {}).setdefault(labels, {})[index] = \
                    float(sample.value)
        probe = frozenset({"job": "sparkytwist-healthz", "instance": "demo"}.items())
        store.series.setdefault("probe_success", {}).setdefault(probe, {})[index] = \
            1.0 if int(health) == 200 else 0.0
    if not store.times:
        raise SystemExit(f"no scrapes in {path}")
    return store


# -- a little PromQL ----------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>\d+(?:\.\d+)?(?![\w]))
  | (?P<dur>\[\d+[smhd]\])
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/(){},=<>])
  | (?P<name>[A-Za-z_:][\w:]*)
)""", re.VERBOSE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos, expr = [], 0, expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot read PromQL at {expr[pos:]!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


@dataclass
class Node:
    kind: str  # num, sel, func, agg, bin
    value: Any = None
    args: tuple[Node, ...] = ()


class Parser:
    """Recursive descent over the forms listed in the module docstring."""

    AGGS = ("sum", "max", "min", "avg", "count")
    FUNCS = ("rate", "irate", "increase")

    def __init__(self, expr: str) -> None:
        self.toks = tokens(expr)
        self.i = 0

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if value is not None and tok[1] != value:
            raise ValueError(f"expected {value!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self) -> Node:
        node = self.expr()
        if self.peek()[0] != "end":
            raise ValueError(f"unexpected {self.peek()[1]!r}")
        return node

    def expr(self) -> Node:
        node = self.term()
        while self.peek()[1] in ("*", "/", "+", "-", "==", ">", "<", ">=", "<=", "!="):
            op = self.take()[1]
            node = Node("bin", op, (node, self.term()))
        return node

    def labels(self) -> tuple[str, ...]:
        self.take("(")
        names = []
        while self.peek()[1] != ")":
            names.append(self.take()[1])
            if self.peek()[1] == ",":
                self.take()
        self.take(")")
        return tuple(names)

    def term(self) -> Node:
        kind, value = self.peek()
        if kind == "num":
            self.take()
            return Node("num", float(value))
        if value == "(":
            self.take()
            node = self.expr()
            self.take(")")
            return node
        if kind == "name" and value in self.AGGS:
            self.take()
            grouping: tuple[str, tuple[str, ...]] = ("without", ())
            if self.peek()[1] in ("by", "without"):
                grouping = (self.take()[1], self.labels())
            self.take("(")
            inner = self.expr()
            self.take(")")
            if self.peek()[1] in ("by", "without"):
                grouping = (self.take()[1], self.labels())
            return Node("agg", (value, grouping), (inner,))
        if kind == "name" and value in self.FUNCS:
            self.take()
            self.take("(")
            selector = self.selector()
            dur = self.take()
            if dur[0] != "dur":
                raise ValueError(f"{value}() needs a range, got {dur[1]!r}")
            self.take(")")
            seconds = int(dur[1][1:-2]) * _UNITS[dur[1][-2]]
            return Node("func", (value, seconds), (selector,))
        return self.selector()

    def selector(self) -> Node:
        name = ""
        if self.peek()[0] == "name":
            name = self.take()[1]
        matchers = []
        if self.peek()[1] == "{":
            self.take()
            while self.peek()[1] != "}":
                label = self.take()[1]
                op = self.take()[1]
                text = json.loads(self.take()[1])
                matchers.append((label, op, text))
                if self.peek()[1] == ",":
                    self.take()
            self.take("}")
        return Node("sel", (name, tuple(matchers)))


def _matches(labels: dict[str, str], matchers: Iterable[tuple[str, str, str]]) -> bool:
    for label, op, text in matchers:
        value = labels.get(label, "")
        if (op == "=" and value != text) or (op == "!=" and value == text):
            return False
        if op in ("=~", "!~") and bool(re.fullmatch(text, value)) != (op == "=~"):
            return False
    return True


class Evaluator:
    def __init__(self, store: Store, max_window: float) -> None:
        self.store = store
        self.max_window = max_window

    def select(self, node: Node) -> dict[Labels, dict[int, float]]:
        name, matchers = node.value
        found: dict[Labels, dict[int, float]] = {}
        names = [name] if name else list(self.store.series)
        for n in names:
            for labels, points in self.store.series.get(n, {}).items():
                full = dict(labels, __name__=n)
                if _matches(full, matchers):
                    found[labels] = points
        return found

    def eval(self, node: Node, at: int) -> Vector | float:
        if node.kind == "num":
            return float(node.value)
        if node.kind == "sel":
            return {labels: points[at] for labels, points in self.select(node).items()
                    if at in points}
        if node.kind == "func":
            return self.range_function(node, at)
        if node.kind == "agg":
            return self.aggregate(node, at)
        return self.binary(node, at)

    def range_function(self, node: Node, at: int) -> Vector:
        func, nominal = node.value
        window = min(nominal, self.max_window)
        times = self.store.times
        out: Vector = {}
        for labels, points in self.select(node.args[0]).items():
            inside = [(times[i], points[i]) for i in sorted(points)
                      if i <= at and times[at] - window - 0.5 < times[i]]
            if len(inside) < 2:
                continue
            if func == "irate":
                inside = inside[-2:]
            gained = 0.0
            for (_, before), (_, after) in itertools.pairwise(inside):
                gained += after - before if after >= before else after  # counter reset
            per_second = gained / (inside[-1][0] - inside[0][0])
            out[labels] = per_second * nominal if func == "increase" else per_second
        return out

    def aggregate(self, node: Node, at: int) -> Vector:
        op, (mode, names) = node.value
        inner = self.eval(node.args[0], at)
        if not isinstance(inner, dict):
            raise TypeError(f"{op}() of a number")
        groups: dict[Labels, list[float]] = {}
        for labels, value in inner.items():
            if mode == "by":
                key = frozenset((k, v) for k, v in labels if k in names)
            else:
                key = frozenset((k, v) for k, v in labels if k not in names and k != "__name__")
            groups.setdefault(key, []).append(value)
        combine = {"sum": sum, "max": max, "min": min, "count": len,
                   "avg": lambda v: sum(v) / len(v)}[op]
        return {key: float(combine(values)) for key, values in groups.items()}

    def binary(self, node: Node, at: int) -> Vector | float:
        op = node.value
        left, right = (self.eval(arg, at) for arg in node.args)
        compare = op in ("==", "!=", ">", "<", ">=", "<=")

        def apply(a: float, b: float) -> float | None:
            if compare:
                ok = {"==": a == b, "!=": a != b, ">": a > b, "<": a < b, ">=": a >= b,
                      "<=": a <= b}[op]
                return a if ok else None
            if op == "/":
                return a / b if b else math.nan
            return {"*": a * b, "+": a + b, "-": a - b}[op]

        if isinstance(left, dict) and isinstance(right, float):
            pairs = {k: apply(v, right) for k, v in left.items()}
        elif isinstance(left, float) and isinstance(right, dict):
            pairs = {k: apply(left, v) for k, v in right.items()}
        elif isinstance(left, float) and isinstance(right, float):
            result = apply(left, right)
            return math.nan if result is None else result
        else:
            raise TypeError("vector-to-vector operations are not supported here")
        return {k: v for k, v in pairs.items() if v is not None}


def substitute(expr: str) -> str:
    """Grafana's variables, with "All" selected."""
    return re.sub(r"\$(\{)?(job|instance)(?(1)\})", ".*", expr)


def legend(fmt: str, labels: Labels, expr: str) -> str:
    if not fmt or fmt == "__auto":
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels)) + "}" or expr
    values = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values.get(m.group(1), ""), fmt)


def series_of(evaluator: Evaluator, expr: str, fmt: str) -> dict[str, list[float]]:
    """legend name -> one value per scrape (NaN where the query has no result)."""
    node = Parser(substitute(expr)).parse()
    n = len(evaluator.store.times)
    out: dict[str, list[float]] = {}
    for at in range(n):
        result = evaluator.eval(node, at)
        vector = result if isinstance(result, dict) else {frozenset(): result}
        for labels, value in vector.items():
            out.setdefault(legend(fmt, labels, expr), [math.nan] * n)[at] = value
    return out


# -- drawing ---------------------------------------------------------------------------

BACKGROUND, PANEL, GRID, TEXT, DIM = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e"
PALETTE = ("#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9",
           "#705DA0", "#37872D", "#FADE2A")
UNITS = {
    "ops": "per second", "reqps": "requests / s", "opm": "per minute", "s": "seconds",
    "short": "", "none": "", "percentunit": "fraction", "bytes": "bytes",
}


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        if panel.get("type") == "row" and panel.get("collapsed"):
            out.extend(panel.get("panels", []))
    return out


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}" if value == int(value) or abs(value) >= 10 else f"{value:.2f}"


def render(dashboard: dict[str, Any], store: Store, out: Path, max_window: float,
           drawn_by: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    evaluator = Evaluator(store, max_window)
    panels = all_panels(dashboard)
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_px, col_px, header_px = 40, 80, 110
    width, height = 24 * col_px, bottom * unit_px + header_px
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=BACKGROUND)
    times = [datetime.fromtimestamp(t) for t in store.times]  # local time, as Grafana
    span = store.times[-1] - store.times[0]
    fig.text(12 / width, 1 - 30 / height, dashboard.get("title", "dashboard"), color=TEXT,
             fontsize=22, fontweight="bold", va="center")
    fig.text(12 / width, 1 - 62 / height,
             f"Rendered from {len(store.times)} scrapes of /metrics ({span:.0f} s of a real "
             f"`twistd sparkytrack` run, {times[0]:%Y-%m-%d %H:%M:%S}); job=All, "
             f"instance=All; range windows capped at {max_window:g} s "
             f"(increase = rate * nominal window). Red bands: /healthz failing "
             f"(the dashboard's annotation).", color=DIM, fontsize=11, va="center")
    commands = f"recorded by: {store.recorded_by or '?'}    drawn by: {drawn_by}"
    fig.text(12 / width, 1 - 86 / height, commands, color=DIM, fontsize=9, va="center",
             family="monospace")
    healthz = dashboard.get("annotations", {}).get("list", [])
    outage_expr = next((a["expr"] for a in healthz if "probe_success" in a.get("expr", "")),
                       None)
    outages: list[int] = []
    if outage_expr:
        down = series_of(evaluator, outage_expr, "")
        outages = sorted({i for values in down.values() for i, v in enumerate(values)
                          if not math.isnan(v)})
    problems = []

    def box(gp: dict[str, int], pad: float = 4) -> tuple[float, float, float, float]:
        x0 = gp["x"] * col_px + pad
        y0 = header_px + gp["y"] * unit_px + pad
        return (x0 / width, 1 - (y0 + gp["h"] * unit_px - 2 * pad) / height,
                (gp["w"] * col_px - 2 * pad) / width, (gp["h"] * unit_px - 2 * pad) / height)

    for panel in panels:
        gp = panel["gridPos"]
        if panel.get("type") == "row":
            x, y, w, h = box(gp, pad=2)
            fig.text(x + 4 / width, y + h / 2, panel["title"], color=TEXT, fontsize=15,
                     fontweight="bold", va="center")
            continue
        x, y, w, h = box(gp)
        fig.patches.append(Rectangle((x, y), w, h, transform=fig.transFigure,
                                     facecolor=PANEL, edgecolor=GRID, zorder=-5))
        fig.text(x + 8 / width, y + h - 16 / height, panel["title"], color=TEXT, fontsize=12,
                 fontweight="bold", va="center")
        ax = fig.add_axes((x + 62 / width, y + 84 / height, w - 78 / width, h - 116 / height),
                          zorder=2)
        ax.set_facecolor(PANEL)
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        unit = defaults.get("unit", "short")
        colors = {}
        for override in panel.get("fieldConfig", {}).get("overrides", []):
            if override.get("matcher", {}).get("id") == "byName":
                for prop in override.get("properties", []):
                    if prop.get("id") == "color":
                        colors[override["matcher"]["options"]] = prop["value"]["fixedColor"]
        stacked = defaults.get("custom", {}).get("stacking", {}).get("mode") == "normal"
        drawn = 0
        for target in panel.get("targets", []):
            try:
                result = series_of(evaluator, target["expr"], target.get("legendFormat", ""))
            except (ValueError, TypeError) as e:
                problems.append(f"{panel['title']}: {e}")
                continue
            for name, values in sorted(result.items()):
                color = colors.get(name, PALETTE[drawn % len(PALETTE)])
                shown = [v for v in values if not math.isnan(v)]
                label = f"{name}  (max {format_value(max(shown), unit)})" if shown else name
                ax.plot(times, values, color=color, linewidth=1.8, label=label)
                if not stacked:
                    ax.fill_between(times, values, color=color, alpha=0.08)
                drawn += 1
        for i in outages:
            ax.axvspan(times[max(i - 1, 0)], times[i], color="#F2495C", alpha=0.18, lw=0)
        if not drawn:
            ax.text(0.5, 0.5, "No data", color=DIM, fontsize=13, ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlim(times[0], times[-1])
        if "min" in defaults:
            ax.set_ylim(bottom=defaults["min"])
        top = ax.get_ylim()[1]
        if top < 1:
            ax.set_ylim(top=1)
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p, u=unit: format_value(v, u)))
        ax.xaxis.set_major_locator(mdates.SecondLocator(bysecond=range(0, 60, 15)))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.set_ylabel(UNITS.get(unit, unit), color=DIM, fontsize=9)
        ax.tick_params(colors=DIM, labelsize=8.5)
        ax.grid(color=GRID, linewidth=0.7)
        for spine in ax.spines.values():
            spine.set_visible(False)
        if drawn:
            ax.legend(loc="upper left", bbox_to_anchor=(-0.02, -0.14), ncol=2 if drawn > 1
                      else 1, frameon=False, fontsize=9, labelcolor=TEXT, handlelength=1.2,
                      columnspacing=1.2, borderaxespad=0)
    fig.savefig(out, dpi=dpi, facecolor=BACKGROUND)
    plt.close(fig)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dashboard", type=Path, default=REPO / "etc/grafana/sparkytwist.json")
    parser.add_argument("--scrapes", type=Path,
                        default=REPO / "docs/img/dashboard-scrapes.txt.gz")
    parser.add_argument("--out", type=Path, default=REPO / "docs/img/dashboard.png")
    parser.add_argument("--max-window", type=float, default=10.0,
                        help="cap of every range window, in seconds (the run is short)")
    opts = parser.parse_args()
    dashboard = json.loads(opts.dashboard.read_text())
    store = load_scrapes(opts.scrapes)
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    script = Path(sys.argv[0]).resolve().relative_to(REPO)
    drawn_by = " ".join([str(python), str(script), *sys.argv[1:]])
    problems = render(dashboard, store, opts.out, opts.max_window, drawn_by)
    for problem in problems:
        print("cannot draw:", problem, file=sys.stderr)
    print(f"{opts.out}: {len(all_panels(dashboard))} panels from {len(store.times)} scrapes")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
