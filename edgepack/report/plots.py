"""Hand-made inline SVG plots for report.html and compare.html (no matplotlib, no external resources).

Every function returns one `<svg>` element as a string; all text is escaped. Shapes carry a `<title>` so
hovering a box, point or bar shows its exact value in a browser without any script.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
INT_COLOR, FLOAT_COLOR, FLAG_COLOR = "#59a14f", "#f28e2b", "#e15759"
_FONT = "font-family=\"system-ui,sans-serif\""
NOT_MEASURED = "not measured on this host"


@dataclass(frozen=True)
class LatencyRow:
    """One candidate in the latency plot: samples (ms) when measured, else a note."""

    name: str
    samples: tuple[float, ...] = ()
    summary: tuple[float, float, float, float] | None = None  # min, p50, p90, max when samples are absent
    note: str | None = None  # "not measured: …" / "failed"


@dataclass(frozen=True)
class Point:
    name: str
    x: float | None  # p50 ms; None: not measured
    y: float
    chosen: bool = False


def _num(v: float) -> str:
    return f"{v:.1f}"


def _text(x: float, y: float, s: str, *, anchor: str = "start", size: int = 11, cls: str = "",
          fill: str = "#222", extra: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return (f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}" font-size="{size}" fill="{fill}"{c}'
            f' {extra}>{escape(s)}</text>')


def _svg(plot_id: str, title: str, width: float, height: float, body: list[str]) -> str:
    head = (f'<svg id="{escape(plot_id)}" class="plot" width="{int(width)}" height="{int(height)}" '
            f'viewBox="0 0 {int(width)} {int(height)}" role="img" aria-label="{escape(title)}" {_FONT}>'
            f'<title>{escape(title)}</title>')
    return head + _text(8, 18, title, size=14, extra='font-weight="bold"') + "".join(body) + "</svg>"


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _label_width(labels: list[str]) -> int:
    """Room for the row labels at 11px (about 6.2 px a character), between 120 and 420 px."""
    return int(min(420, max(120, 6.2 * max((len(s) for s in labels), default=0) + 16)))


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


class Scale:
    """Maps data values to pixels, linear or log10."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool = False):
        if log:
            lo, hi = max(lo, 1e-9), max(hi, lo * 10)
        elif hi <= lo:
            hi = lo + (abs(lo) * 0.1 or 1.0)
        self.lo, self.hi, self.p0, self.p1, self.log = lo, hi, p0, p1, log

    def __call__(self, v: float) -> float:
        f = (lambda t: math.log10(max(t, 1e-12))) if self.log else (lambda t: t)
        return self.p0 + (f(v) - f(self.lo)) / (f(self.hi) - f(self.lo)) * (self.p1 - self.p0)

    def ticks(self) -> list[float]:
        if self.log:
            out = []
            for k in range(math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi)) + 1):
                out += [m * 10**k for m in (1, 2, 5) if self.lo <= m * 10**k <= self.hi]
            return out
        raw = (self.hi - self.lo) / 5
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        first = math.ceil(self.lo / step - 1e-9) * step
        return [first + i * step for i in range(int((self.hi - first) / step + 1e-9) + 1)]


def _range(values: list[float], log: bool) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if log:
        return lo / 1.3, hi * 1.3
    return 0.0, hi * 1.08 if hi > 0 else 1.0


def _use_log(values: list[float]) -> bool:
    pos = [v for v in values if v > 0]
    return bool(pos) and max(pos) / min(pos) > 30


def _x_axis(sx: Scale, y: float, top: float, label: str) -> list[str]:
    out = [f'<line x1="{_num(sx.p0)}" y1="{_num(y)}" x2="{_num(sx.p1)}" y2="{_num(y)}" stroke="#888"/>']
    for t in sx.ticks():
        x = sx(t)
        out.append(f'<line x1="{_num(x)}" y1="{_num(top)}" x2="{_num(x)}" y2="{_num(y)}" stroke="#eee"/>')
        out.append(_text(x, y + 14, f"{t:.6g}", anchor="middle", size=10, fill="#555"))
    out.append(_text((sx.p0 + sx.p1) / 2, y + 30, label + (" (log scale)" if sx.log else ""), anchor="middle",
                     size=11, fill="#333"))
    return out


def _quantile(xs: list[float], q: float) -> float:
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_plot(rows: list[LatencyRow], plot_id: str = "plot-latency") -> str:
    """Box plot with the raw samples as a strip per candidate; rows without latency say why."""
    label_w, right, row_h, top = _label_width([r.name for r in rows]), 30, 36, 34
    width = label_w + 560
    values = [v for r in rows for v in (r.samples or (r.summary or ()))]
    log = _use_log(values) if values else False
    lo, hi = _range(values, log) if values else (0.0, 1.0)
    sx = Scale(lo, hi, label_w, width - right, log)
    bottom = top + row_h * max(1, len(rows))
    body = _x_axis(sx, bottom, top, "latency per iteration (ms)") if values else \
        [_not_measured_note((label_w + width - right) / 2, bottom + 22, "latency " + NOT_MEASURED)]
    for i, r in enumerate(rows):
        y, color = top + i * row_h + row_h / 2, PALETTE[i % len(PALETTE)]
        body.append(_text(label_w - 8, y + 4, _short(r.name, int(label_w / 6.2)), anchor="end"))
        if r.note is not None or not (r.samples or r.summary):
            body.append(_text(label_w + 6, y + 4, _short(r.note or "not measured", 90), cls="not-measured",
                              fill="#888", extra='font-style="italic"'))
            continue
        if r.samples:
            xs = sorted(r.samples)
            mn, q1, med, q3, mx = xs[0], _quantile(xs, .25), _quantile(xs, .5), _quantile(xs, .75), xs[-1]
        else:
            mn, med, q3, mx = r.summary  # type: ignore[misc]
            q1 = med
        tip = f"{r.name}: min {_fmt(mn)}, p25 {_fmt(q1)}, median {_fmt(med)}, p75 {_fmt(q3)}, max {_fmt(mx)} ms"
        body.append(f'<line x1="{_num(sx(mn))}" y1="{_num(y)}" x2="{_num(sx(mx))}" y2="{_num(y)}" '
                    f'stroke="{color}"/>')
        for w in (mn, mx):
            body.append(f'<line x1="{_num(sx(w))}" y1="{_num(y - 6)}" x2="{_num(sx(w))}" y2="{_num(y + 6)}" '
                        f'stroke="{color}"/>')
        body.append(f'<rect class="box" x="{_num(sx(q1))}" y="{_num(y - 10)}" '
                    f'width="{_num(max(sx(q3) - sx(q1), 1.5))}" height="20" fill="{color}" fill-opacity="0.25" '
                    f'stroke="{color}"><title>{escape(tip)}</title></rect>')
        body.append(f'<line x1="{_num(sx(med))}" y1="{_num(y - 10)}" x2="{_num(sx(med))}" y2="{_num(y + 10)}" '
                    f'stroke="#222" stroke-width="2"/>')
        step = max(1, len(r.samples) // 150)  # at most ~150 dots per row
        for j, v in enumerate(r.samples[::step]):
            jitter = ((j * 7919) % 13 - 6) * 1.2  # deterministic spread so equal times do not stack
            body.append(f'<circle cx="{_num(sx(v))}" cy="{_num(y + jitter)}" r="1.6" fill="{color}" '
                        f'fill-opacity="0.6"/>')
    return _svg(plot_id, "Latency distribution per candidate", width, bottom + 40, body)


def pareto_front(points: list[Point]) -> list[Point]:
    """Points no other point beats on both latency (lower) and quality (higher), by latency."""
    front: list[Point] = []
    for p in sorted((p for p in points if p.x is not None), key=lambda p: (p.x, -p.y)):
        if not front or p.y > front[-1].y:
            front.append(p)
    return front


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in SVG pixels
LABEL_H = 12.0  # a 10 px label's box height


def text_width(s: str, size: int = 10, bold: bool = False) -> float:
    """Estimated width of `s` in system-ui at `size` px (a little generous, so estimates do not overlap)."""
    return len(s) * size * (0.64 if bold else 0.6) + 2


def overlaps(a: Box, b: Box, gap: float = 1.0) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def place_labels(anchors: list[tuple[float, float, float]], widths: list[float], bounds: Box,
                 prefer_below: list[bool] | None = None) -> list[Box]:
    """A box for each label next to its point (cx, cy, radius), none overlapping another label or point.

    Tries right, left, above and below the point, then further up and down beside it; stays inside
    `bounds` where it can. Labels are placed in the order given (put the chosen one first).
    """
    placed: list[Box] = []
    dots = [(cx - r, cy - r, cx + r, cy + r) for cx, cy, r in anchors]
    for i, ((cx, cy, r), w) in enumerate(zip(anchors, widths)):
        h = LABEL_H
        right, left, mid = cx + r + 3, cx - r - 3 - w, cx - w / 2
        spots = [(right, cy - h - 1), (left, cy - h - 1), (right, cy - h / 2), (left, cy - h / 2),
                 (mid, cy - r - 2 - h), (mid, cy + r + 2), (right, cy + 1), (left, cy + 1)]
        if prefer_below and prefer_below[i]:
            spots = [(mid, cy + r + 2), (mid, cy - r - 2 - h)] + spots
        for k in range(1, 40):  # further away, alternating up and down
            for x in (right, left, mid):
                spots += [(x, cy - h / 2 - k * (h + 1)), (x, cy - h / 2 + k * (h + 1))]
        inside = [sp for sp in spots if bounds[0] <= sp[0] and sp[0] + w <= bounds[2]
                  and bounds[1] <= sp[1] and sp[1] + h <= bounds[3]]
        for x, y in inside + spots:
            box = (x, y, x + w, y + h)
            if not any(overlaps(box, o) for o in placed) and \
                    not any(overlaps(box, d, 0.0) for j, d in enumerate(dots) if j != i):
                placed.append(box)
                break
        else:  # unreachable in practice: 240 spots per label
            placed.append((right, cy - h / 2, right + w, cy + h / 2))
    return placed


def _not_measured_note(x: float, y: float, text: str = NOT_MEASURED) -> str:
    return _text(x, y, text, anchor="middle", size=12, cls="not-measured", fill="#888", extra='font-style="italic"')


def scatter_plot(points: list[Point], y_label: str, plot_id: str = "plot-tradeoff") -> str:
    """Quality vs p50 latency; the chosen point ringed, the Pareto front dashed, unmeasured ones in a side band.

    Labels never overlap (place_labels); each is a `<text class="label">` with a `data-box` of its estimate.
    """
    left, top, width, height, band = 70, 34, 760, 360, 130
    measured = [p for p in points if p.x is not None]
    others = [p for p in points if p.x is None]
    plot_r = width - 20 - (band if others else 0)
    xs = [p.x for p in measured] or [1.0]
    log = _use_log(xs)
    x_lo, x_hi = (min(xs) / 1.4, max(xs) * 1.4) if log else (0.0, max(xs) * 1.15 or 1.0)
    sx = Scale(x_lo, x_hi, left, plot_r, log)
    ys = [p.y for p in points] or [0.0]
    pad = max((max(ys) - min(ys)) * 0.15, 0.002)
    sy = Scale(min(ys) - pad, max(ys) + pad, height - 50, top + 10)
    body = _x_axis(sx, height - 50, top, "p50 latency (ms)") if measured else []
    for t in sy.ticks():
        y = sy(t)
        body.append(f'<line x1="{left}" y1="{_num(y)}" x2="{_num(plot_r)}" y2="{_num(y)}" stroke="#eee"/>')
        body.append(_text(left - 6, y + 4, f"{t:.4g}", anchor="end", size=10, fill="#555"))
    body.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - 50}" stroke="#888"/>')
    body.append(_text(16, (top + height - 50) / 2, y_label, anchor="middle",
                      extra=f'transform="rotate(-90 16 {_num((top + height - 50) / 2)})"'))
    if not measured:
        body.append(_not_measured_note((left + plot_r) / 2, (top + height - 50) / 2, "latency " + NOT_MEASURED))
    front = pareto_front(measured)
    if len(front) > 1:
        pts = " ".join(f"{_num(sx(p.x))},{_num(sy(p.y))}" for p in front)
        body.append(f'<polyline class="pareto" points="{pts}" fill="none" stroke="#555" stroke-dasharray="5 4"/>')
    if others:
        bx = plot_r + 20
        body.append(f'<rect x="{bx}" y="{top}" width="{band - 24}" height="{height - 50 - top}" fill="#f4f4f4"/>')
        body.append(_text(bx + (band - 24) / 2, top + 14, "not measured", anchor="middle", size=10, fill="#666"))
    anchors, labels, widths = [], [], []
    for i, p in enumerate(points):
        color = PALETTE[i % len(PALETTE)]
        tip = f"{p.name}: {y_label} {p.y:.4g}" + (f", p50 {_fmt(p.x)} ms" if p.x is not None else ", not measured")
        if p.x is None:
            cx, fill = plot_r + 20 + (band - 24) / 2, "white"
        else:
            cx, fill = sx(p.x), color
        cy, r = sy(p.y), 8 if p.chosen else 5
        stroke = 'stroke="#111" stroke-width="2.5"' if p.chosen else f'stroke="{color}" stroke-width="1.5"'
        body.append(f'<circle class="point{" chosen" if p.chosen else ""}" cx="{_num(cx)}" cy="{_num(cy)}" r="{r}" '
                    f'fill="{fill}" {stroke}><title>{escape(tip)}</title></circle>')
        label = _short(p.name, 26) + (" (chosen)" if p.chosen else "")
        anchors.append((cx, cy, float(r)))
        labels.append(label)
        widths.append(text_width(label, 10, p.chosen))
    order = sorted(range(len(points)), key=lambda i: not points[i].chosen)  # the chosen label gets the best spot
    boxes = place_labels([anchors[i] for i in order], [widths[i] for i in order], (left + 2, top, width - 4, height - 40),
                         [points[i].x is None for i in order])
    for i, box in zip(order, boxes):
        cx, cy, rr = anchors[i]
        near = box[0] <= cx + rr + 4 and box[2] >= cx - rr - 4 and box[1] <= cy + rr + 4 and box[3] >= cy - rr - 4
        if not near:  # moved away from its point: a thin leader line shows whose label it is
            lx = min(max(cx, box[0]), box[2])
            ly = box[3] if box[3] < cy else box[1]
            body.append(f'<line class="leader" x1="{_num(cx)}" y1="{_num(cy)}" x2="{_num(lx)}" y2="{_num(ly)}" '
                        'stroke="#999" stroke-width="0.8"/>')
        data = ",".join(_num(v) for v in box)
        body.append(_text(box[0] + 1, box[3] - 2.5, labels[i], size=10, cls="label",
                          extra=f'data-box="{data}"' + (' font-weight="bold"' if points[i].chosen else "")))
    if len(front) > 1:  # the legend only when there is a line to explain
        legend_y = height - 8
        body.append(f'<line x1="{left}" y1="{legend_y - 4}" x2="{left + 24}" y2="{legend_y - 4}" stroke="#555" '
                    f'stroke-dasharray="5 4"/>')
        body.append(_text(left + 30, legend_y, "Pareto front (faster and better than every other point)", size=10))
    return _svg(plot_id, f"{y_label[:1].upper()}{y_label[1:]} vs p50 latency", width, height, body)


def bar_plot(title: str, labels: list[str], series: list[tuple[str, list[float | None], str]], unit: str, *,
             plot_id: str, notes: dict[int, str] | None = None, bar_colors: list[str] | None = None,
             legend: list[tuple[str, str]] | None = None) -> str:
    """Horizontal grouped bars: one group per label, one bar per series (None: the row's note instead)."""
    label_w, bar_h, gap, top = _label_width(labels), 14, 10, 34
    width = label_w + 560
    notes = notes or {}
    vals = [v for _, vs, _ in series for v in vs if v is not None]
    sx = Scale(0.0, max(vals) * 1.12 if vals and max(vals) > 0 else 1.0, label_w, width - 60)
    group_h = bar_h * len(series) + gap
    bottom = top + group_h * max(1, len(labels)) + 4
    body = _x_axis(sx, bottom, top, unit) if vals else []  # nothing to draw: no empty axis either
    for i, label in enumerate(labels):
        y0 = top + i * group_h + gap / 2
        body.append(_text(label_w - 8, y0 + group_h / 2, _short(label, int(label_w / 6.2)), anchor="end"))
        if i in notes:
            body.append(_text(label_w + 6, y0 + group_h / 2, notes[i], cls="not-measured", fill="#888",
                              extra='font-style="italic"'))
            continue
        for j, (name, values, color) in enumerate(series):
            v = values[i]
            if v is None:
                continue
            fill = bar_colors[i] if bar_colors else color
            y = y0 + j * bar_h
            tip = f"{label} {name}: {_fmt(v)} {unit}".replace("  ", " ")
            body.append(f'<rect class="bar" x="{label_w}" y="{_num(y)}" width="{_num(max(sx(v) - label_w, 1))}" '
                        f'height="{bar_h - 2}" fill="{fill}"><title>{escape(tip)}</title></rect>')
            body.append(_text(sx(v) + 4, y + bar_h - 4, _fmt(v), size=10, fill="#444"))
    entries = (legend if legend is not None else [(n, c) for n, _, c in series]) if vals else []
    x = float(label_w)
    for name, color in entries:
        body.append(f'<rect x="{x}" y="{_num(bottom + 40)}" width="10" height="10" fill="{color}"/>')
        body.append(_text(x + 14, bottom + 49, name, size=10))
        x += 24 + 6.5 * len(name)
    return _svg(plot_id, title, width, bottom + 58, body)


def whisker_plot(title: str, labels: list[str], values: list[tuple[float, float] | None], unit: str, *,
                 plot_id: str, notes: dict[int, str] | None = None) -> str:
    """One row per run: a dot at p50 and a whisker to p90, on a log scale (runs can differ 100×)."""
    label_w, row_h, top = _label_width(labels), 28, 34
    width = label_w + 560
    notes = notes or {}
    nums = [v for pair in values if pair for v in pair if v and v > 0]
    lo, hi = (min(nums) / 1.5, max(nums) * 1.5) if nums else (0.1, 1.0)
    sx = Scale(lo, hi, label_w, width - 60, log=True)
    bottom = top + row_h * max(1, len(labels)) + 4
    body = _x_axis(sx, bottom, top, f"{unit}: dot p50, whisker to p90") if nums else \
        [_not_measured_note((label_w + width - 60) / 2, bottom + 22, "latency " + NOT_MEASURED)]
    for i, label in enumerate(labels):
        y = top + i * row_h + row_h / 2
        body.append(_text(label_w - 8, y + 4, _short(label, int(label_w / 6.2)), anchor="end"))
        pair = values[i]
        if i in notes or not pair:
            body.append(_text(label_w + 6, y + 4, notes.get(i, "not measured"), cls="not-measured", fill="#888",
                              extra='font-style="italic"'))
            continue
        p50, p90 = pair
        color = PALETTE[i % len(PALETTE)]
        tip = f"{label}: p50 {_fmt(p50)} {unit}, p90 {_fmt(p90)} {unit}"
        body.append(f'<line class="whisker" x1="{_num(sx(p50))}" y1="{_num(y)}" x2="{_num(sx(p90))}" y2="{_num(y)}" '
                    f'stroke="{color}" stroke-width="2"/>')
        body.append(f'<line x1="{_num(sx(p90))}" y1="{_num(y - 6)}" x2="{_num(sx(p90))}" y2="{_num(y + 6)}" '
                    f'stroke="{color}" stroke-width="2"/>')
        body.append(f'<circle class="p50" cx="{_num(sx(p50))}" cy="{_num(y)}" r="5" fill="{color}">'
                    f'<title>{escape(tip)}</title></circle>')
        body.append(_text(max(sx(p90), sx(p50) + 6) + 6, y + 4, f"{_fmt(p50)} ({_fmt(p90)})", size=10, fill="#444"))
    return _svg(plot_id, title, width, bottom + 40, body)
