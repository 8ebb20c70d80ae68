"""Interactive pieces of a report page: SVG heatmaps with a value on hover, and the circuit graph as a
zoomable SVG with each edge's score on hover.

Plain SVG with ``<title>`` elements: browsers show a title as a tooltip, print it as a picture, and need
no network or library. The circuit view adds a few lines of inline script for wheel zoom and drag
(double-click resets); without script it is still the whole graph. Every label and name is escaped.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

from circuitlab.report.figure_data import Heatmap

MAX_HEATMAP_WIDTH = 960  # px: the page's content width
LABEL_FONT = 10  # px
MAX_CIRCUIT_EDGES = 600  # beyond this the strongest are drawn and the caption says so


def _fmt(value: float | None) -> str:
    return "no value" if value is None else f"{value:.4g}"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def heatmap_svg(heatmap: Heatmap, uid: str) -> str:
    """One heatmap as SVG: a rect per cell (hover: row, column and value), tick labels, a colour legend.
    `uid`: unique on the page (names the legend's gradient)."""
    n_rows, n_cols = len(heatmap.rows), len(heatmap.cols)
    rows, cols = _shown_labels(heatmap.rows, heatmap.row_ids), _shown_labels(heatmap.cols, heatmap.col_ids)
    row_label_w = 8 + 6 * max((len(r) for r in rows), default=0)
    row_label_w = min(max(row_label_w, 24), 220)
    cell = max(4.0, min(36.0, (MAX_HEATMAP_WIDTH - row_label_w - 20) / max(n_cols, 1)))
    cell_h = max(4.0, min(22.0, cell))
    col_label_h = 8 + 5 * max((len(c) for c in cols), default=0)
    col_label_h = min(max(col_label_h, 20), 140)
    top = 24 if heatmap.title else 6
    width = max(row_label_w + n_cols * cell + 10, row_label_w + 200)
    height = top + n_rows * cell_h + col_label_h + 34
    parts = [f"<svg class=heatmap xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
             f"viewBox='0 0 {width:.0f} {height:.0f}' role=img aria-label='{_esc(heatmap.title or 'heatmap')}'>"]
    if heatmap.title:
        parts.append(f"<text x='{row_label_w}' y='15' font-size='12' font-weight='600'>{_esc(heatmap.title)}</text>")
    for i, (label, rid) in enumerate(zip(heatmap.rows, heatmap.row_ids, strict=True)):
        y = top + i * cell_h
        row_name = label or f"{heatmap.y_label or 'row'} {rid}"
        if rows[i]:
            parts.append(f"<text x='{row_label_w - 4}' y='{y + cell_h / 2 + 3.5:.1f}' font-size='{LABEL_FONT}' "
                         f"text-anchor='end'>{_esc(rows[i])}</text>")
        for j, (col_label, cid) in enumerate(zip(heatmap.cols, heatmap.col_ids, strict=True)):
            color = heatmap.colors[i][j]
            col_name = col_label or f"{heatmap.x_label or 'column'} {cid}"
            fill = color or "#ffffff"
            tip = f"{row_name} · {col_name}: {_fmt(heatmap.values[i][j])}"
            parts.append(f"<rect x='{row_label_w + j * cell:.1f}' y='{y:.1f}' width='{cell:.1f}' height='{cell_h:.1f}' "
                         f"fill='{fill}'><title>{_esc(tip)}</title></rect>")
    base = top + n_rows * cell_h
    for j, label in enumerate(cols):
        if label:
            x = row_label_w + (j + 0.5) * cell
            parts.append(f"<text transform='translate({x + 3:.1f},{base + 4:.1f}) rotate(-60)' font-size='{LABEL_FONT}' "
                         f"text-anchor='end'>{_esc(label)}</text>")
    legend_y = base + col_label_h + 6
    if heatmap.x_label:
        parts.append(f"<text x='{row_label_w + n_cols * cell / 2:.1f}' y='{legend_y}' font-size='11' "
                     f"text-anchor='middle'>{_esc(heatmap.x_label)}</text>")
    if heatmap.y_label:
        parts.append(f"<text transform='translate(10,{top + n_rows * cell_h / 2:.1f}) rotate(-90)' font-size='11' "
                     f"text-anchor='middle'>{_esc(heatmap.y_label)}</text>")
    gradient_id = f"legend-{uid}"
    parts.append(f"<defs><linearGradient id='{gradient_id}'><stop offset='0' stop-color='{heatmap.low_color}'/>"
                 f"<stop offset='1' stop-color='{heatmap.high_color}'/></linearGradient></defs>")
    low = _fmt(heatmap.vmin)
    bar_x = row_label_w + 6 * len(low) + 6
    parts.append(f"<text x='{row_label_w}' y='{legend_y + 20}' font-size='10'>{_esc(low)}</text>"
                 f"<rect x='{bar_x}' y='{legend_y + 11}' width='120' height='10' fill='url(#{gradient_id})'/>"
                 f"<text x='{bar_x + 124}' y='{legend_y + 20}' font-size='10'>{_esc(_fmt(heatmap.vmax))}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _shown_labels(labels: list[str], ids: list[int], most: int = 20) -> list[str]:
    """The labels drawn on an axis: the figure's own, or (when it had none) every k-th cell's index."""
    if any(labels):
        return labels
    stride = max(1, -(-len(ids) // most))
    return [str(i) if i % stride == 0 else "" for i in ids]


# --- circuit graph ----------------------------------------------------------------------------------------
_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")


def _node_place(name: str, n_layers: int, n_heads: int) -> tuple[float, float] | None:
    """(column, row) of a node: heads left to right in their layer's row, the MLP after them, the input
    at the bottom, the logits at the top."""
    if name == "input":
        return (n_heads + 1) / 2, 0.0
    if name == "logits":
        return (n_heads + 1) / 2, 2.0 * n_layers + 1
    if match := _HEAD.match(name):
        return float(match.group(2)), 2.0 * int(match.group(1)) + 0.6
    if match := _MLP.match(name):
        return float(n_heads + 1), 2.0 * int(match.group(1)) + 1.4
    return None


def circuit_svg(data: dict[str, Any]) -> tuple[str, str]:
    """The in-graph edges of an EAP-IG/MIB circuit file as a zoomable SVG, and a caption."""
    cfg = data.get("cfg", {}) if isinstance(data, dict) else {}
    n_layers, n_heads = int(cfg.get("n_layers", 0) or 0), int(cfg.get("n_heads", 0) or 0)
    edges = [(name, info.get("score", 0.0)) for name, info in (data.get("edges") or {}).items()
             if isinstance(info, dict) and info.get("in_graph")]
    kept = len(edges)
    edges.sort(key=lambda item: -abs(item[1]) if isinstance(item[1], (int, float)) and math.isfinite(item[1]) else 0.0)
    edges = edges[:MAX_CIRCUIT_EDGES]
    scale_x, pad = 46.0, 30.0
    scale_y = max(34.0, 320.0 / (2 * n_layers + 1))  # small models still get a readable picture
    width = (n_heads + 2) * scale_x + 2 * pad
    height = (2 * n_layers + 1) * scale_y + 2 * pad

    def xy(place: tuple[float, float]) -> tuple[float, float]:
        return pad + place[0] * scale_x, height - pad - place[1] * scale_y

    nodes: set[str] = set()
    strongest = max((abs(s) for _, s in edges if isinstance(s, (int, float)) and math.isfinite(s)), default=0.0) or 1.0
    lines = []
    for name, score in edges:
        sender, receiver = name.split("->", 1)
        target = receiver.split("<", 1)[0]
        a, b = _node_place(sender, n_layers, n_heads), _node_place(target, n_layers, n_heads)
        if a is None or b is None:
            continue
        nodes.update((sender, target))
        (x1, y1), (x2, y2) = xy(a), xy(b)
        value = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else 0.0
        stroke = "#c0392b" if value < 0 else "#2166ac"
        w = 0.6 + 3.4 * abs(value) / strongest
        lines.append(f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' stroke='{stroke}' "
                     f"stroke-width='{w:.2f}' stroke-opacity='.55'><title>{_esc(name)}: {_esc(_fmt(value))}</title></line>")
    dots = []
    for name in sorted(nodes):
        place = _node_place(name, n_layers, n_heads)
        if place is None:
            continue
        x, y = xy(place)
        fill = "#f5b041" if name.startswith("m") else "#7fb3d5" if name.startswith("a") else "#d5d8dc"
        score = (data.get("nodes") or {}).get(name, {})
        node_score = score.get("score") if isinstance(score, dict) else None
        tip = name if node_score is None else f"{name}: {_fmt(node_score)}"
        dots.append(f"<g><circle cx='{x:.1f}' cy='{y:.1f}' r='9' fill='{fill}' stroke='#555' stroke-width='.6'/>"
                    f"<text x='{x:.1f}' y='{y + 3:.1f}' font-size='6.5' text-anchor='middle'>{_esc(name)}</text>"
                    f"<title>{_esc(tip)}</title></g>")
    svg = (f"<svg class=circuit xmlns='http://www.w3.org/2000/svg' width='100%' height='{min(height, 900):.0f}' "
           f"viewBox='0 0 {width:.0f} {height:.0f}' data-viewbox='0 0 {width:.0f} {height:.0f}' role=img "
           f"aria-label='circuit graph'>{''.join(lines)}{''.join(dots)}</svg>")
    caption = (f"{kept} edges in the circuit" + (f" (strongest {MAX_CIRCUIT_EDGES} drawn)" if kept > len(edges) else "")
               + "; blue = positive score, red = negative; hover an edge or node for its score; wheel to zoom, "
                 "drag to pan, double-click to reset")
    return svg, caption


# Wheel zoom and drag for every svg.circuit on the page; double-click restores the original view.
ZOOM_SCRIPT = """
document.querySelectorAll('svg.circuit').forEach(function(svg){
 var v=svg.getAttribute('data-viewbox').split(' ').map(Number),box=v.slice(),drag=null;
 function set(){svg.setAttribute('viewBox',box.join(' '));}
 svg.addEventListener('wheel',function(e){e.preventDefault();var r=svg.getBoundingClientRect(),
  f=e.deltaY<0?0.8:1.25,px=box[0]+(e.clientX-r.left)/r.width*box[2],py=box[1]+(e.clientY-r.top)/r.height*box[3];
  box=[px-(px-box[0])*f,py-(py-box[1])*f,box[2]*f,box[3]*f];set();},{passive:false});
 svg.addEventListener('mousedown',function(e){drag=[e.clientX,e.clientY];});
 window.addEventListener('mouseup',function(){drag=null;});
 svg.addEventListener('mousemove',function(e){if(!drag)return;var r=svg.getBoundingClientRect();
  box[0]-=(e.clientX-drag[0])/r.width*box[2];box[1]-=(e.clientY-drag[1])/r.height*box[3];
  drag=[e.clientX,e.clientY];set();});
 svg.addEventListener('dblclick',function(){box=v.slice();set();});
});
"""
