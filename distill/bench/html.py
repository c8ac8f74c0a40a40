"""Pages for people: report.html (one benchmark) and compare.html (checkpoints side by side).

Each page sits in its report's folder and needs nothing else: relative links only, no network, styles and
the player script inline. Its video grid has a row per (prompt, seed) and a column per model; the videos
play in sync (all restart together once every one has ended) at a chosen speed.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1rem;color:#222;max-width:100%}
h1{font-size:1.35rem}h2{font-size:1.1rem;margin-top:1.6rem}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #ddd;padding:.25rem .5rem;text-align:right;white-space:nowrap}
th{background:#f4f4f4;position:sticky;top:0}
td.prompt,th.prompt{text-align:left;white-space:normal;min-width:9rem}
tr.regressed td{background:#fde8e8}
.grid td{text-align:center;padding:.2rem}
.grid video{width:128px;height:auto;image-rendering:pixelated;display:block;background:#000}
.none{color:#999}
.controls{position:sticky;top:0;background:#fff;padding:.4rem 0;z-index:1}
img.plot{max-width:100%;height:auto;display:block;margin:.5rem 0}
.muted{color:#666}
@media (max-width:600px){.grid video{width:96px}td.prompt,th.prompt{min-width:6rem}body{margin:.5rem}}
"""

_SCRIPT = """
const videos = Array.from(document.querySelectorAll("video"));
const button = document.getElementById("play"), rate = document.getElementById("rate");
let playing = true;
function restart() {
  videos.forEach(v => { v.currentTime = 0; v.playbackRate = +rate.value; if (playing) v.play().catch(() => {}); });
}
function whenAllEnded() { if (playing && videos.every(v => v.ended || v.error)) restart(); }
videos.forEach(v => v.addEventListener("ended", whenAllEnded));
button.onclick = () => {
  playing = !playing;
  button.textContent = playing ? "pause" : "play";
  videos.forEach(v => playing ? v.play().catch(() => {}) : v.pause());
};
rate.onchange = () => videos.forEach(v => v.playbackRate = +rate.value);
document.getElementById("restart").onclick = restart;
window.addEventListener("load", restart);
"""


def page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>", *body, f"<script>{_SCRIPT}</script></body></html>", ""])


def table_html(frame: pd.DataFrame, regressed: list[bool] | None = None, table_id: str | None = None) -> str:
    """A scrollable table; floats to 4 significant digits, missing values as a dash; rows marked `regressed`
    are shaded."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        cls = ' class="regressed"' if regressed and regressed[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>")
    attributes = f' id="{table_id}"' if table_id else ""
    return f'<div class="scroll"><table{attributes}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def video_grid(rows: list[dict], columns: list[dict]) -> str:
    """The grid: `rows` of {prompt, seed}; `columns` of {title, videos: a relative path or None per row}."""
    controls = ('<div class="controls"><button id="play">pause</button> '
                '<button id="restart">restart</button> speed <select id="rate">'
                '<option value="0.25">0.25×</option><option value="0.5">0.5×</option>'
                '<option value="1" selected>1×</option></select> '
                f'<span class="muted">{len(rows)} rows × {len(columns)} models</span></div>')
    head = '<th class="prompt">prompt</th><th>seed</th>' + "".join(
        f"<th>{html.escape(c['title'])}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = [f'<td class="prompt">{html.escape(str(row["prompt"]))}</td><td>{row["seed"]}</td>']
        for column in columns:
            src = column["videos"][i]
            cells.append(f'<td><video src="{html.escape(src)}" muted playsinline preload="auto"></video></td>'
                         if src else '<td class="none">–</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (controls + f'<div class="scroll"><table class="grid" id="videos"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def column_title(column: dict, checkpoint_label: str | None = None) -> str:
    """`student sde-4 @ step-000300`, `teacher ode-50 CFG 4`, `data (held out)`."""
    if column["model"] == "data":
        return "data (held out)"
    title = f"{column['model']} {column['sampler']}-{column['steps']}"
    if column.get("guidance") not in (None, 1.0):
        title += f" CFG {column['guidance']:g}"
    return title + (f" @ {checkpoint_label}" if checkpoint_label else "")


def plots_html(plots: list[str]) -> list[str]:
    return [f'<img class="plot" src="{html.escape(p)}" alt="{html.escape(p)}">' for p in plots]


def write_page(out_dir: Path, name: str, title: str, body: list[str]) -> Path:
    path = Path(out_dir) / name
    path.write_text(page(title, body))
    return path
