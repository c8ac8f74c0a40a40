"""`distill compare`: benchmark reports side by side.

Reports line up by (model, sampler, steps). The comparison folder holds compare.parquet / compare.csv (each
metric per report and its delta against the first report that has the row), regressions.json,
compare.md (the regressions first, then one row per model and checkpoint with the metrics as columns, then
the deltas) and compare.html: the same tables, a plot of the metrics per checkpoint, and the videos of every
report in one grid (copied in, so the folder stands alone).
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from distill.bench.html import column_title, plots_html, table_html, video_grid, write_page
from distill.bench.report import KEY, LOWER_IS_BETTER, QUALITY, md_table
from distill.errors import InputError
from distill.outputs import check_output_folder, staged_folder

SPREADS = {"latency_s": ["latency_spread_s"], "denoise_s": ["denoise_spread_s"],
           "decode_s": ["latency_spread_s", "denoise_spread_s"]}
"""The spread columns (max - min over a report's videos) that bound a timing's run-to-run noise."""
DELTAS_HEADING = "## Deltas against the first report"
"""compare.md's last section, the long table (the flows' artifact stops before it)."""


@dataclass
class Regression:
    metric: str
    key: tuple
    label: str
    before: float
    after: float

    def __str__(self) -> str:
        return (f"{self.metric} of {self.key[0]} {self.key[1]} {self.key[2]}-step: {self.before:.4g} -> "
                f"{self.after:.4g} in {self.label}")


def compare(reports: list[Path], out_dir: Path | None = None, tolerance: float = 0.02,
            latency_tolerance: float = 0.10) -> tuple[pd.DataFrame, str]:
    """Line reports up by (model, sampler, steps): each metric per report, its delta against the
    first report that has the row, and a regression flag where a later report is worse by more
    than `tolerance` (absolute for fractions in [0, 1], else relative), or, for timings, by more than
    `latency_tolerance` (relative) and more than the two reports' spreads of that timing together.
    A row whose weights are the same in every report (the frozen teacher, the data) is never flagged.
    Returns the long table (metric per row) and compare.md's text."""
    if not reports:
        raise InputError("compare: no reports given; pass at least one report folder")
    tables = [read_report_table(Path(path)) for path in reports]
    if out_dir is not None:
        check_output_folder(out_dir, what="comparison folder", how="empty it", replaceable=is_comparison)
    labels = [str(table["checkpoint"].iloc[0]) for table in tables]
    if len(set(labels)) < len(labels):  # same checkpoint names from different runs: <run>/<checkpoint>
        labels = [_run_label(Path(p), label) for p, label in zip(reports, labels)]
    metrics = [c for c in tables[0].columns if c in QUALITY or c in LOWER_IS_BETTER or c.startswith(("fd_", "clip"))]
    frame, flags = _deltas(tables, labels, metrics, tolerance, latency_tolerance)
    wide, regressed = wide_table(tables, labels, metrics, flags)

    def markdown(plots: list[str]) -> str:
        return "\n".join(["# Comparison", "", "## Regressions", "",
                          "".join(f"- {f}\n" for f in flags) if flags else "None beyond the tolerance.\n",
                          "## Side by side (regressed rows first)", "", md_table(wide),
                          *[f"![{p}]({p})\n" for p in plots],
                          DELTAS_HEADING, "", md_table(frame)])

    if out_dir is not None:
        with staged_folder(out_dir) as staging:
            frame.to_parquet(staging / "compare.parquet", index=False)
            frame.to_csv(staging / "compare.csv", index=False)
            (staging / "regressions.json").write_text(json.dumps([str(f) for f in flags], indent=2))
            plots = _plot(staging, tables, labels)
            (staging / "compare.md").write_text(md := markdown(plots))
            body = ["<h2>Regressions</h2>",
                    "<ul>" + "".join(f"<li>{html.escape(str(f))}</li>" for f in flags) + "</ul>" if flags
                    else "<p>None beyond the tolerance.</p>",
                    "<h2>Side by side</h2>", table_html(wide, regressed, "side-by-side"), *plots_html(plots),
                    "<h2>Videos</h2>", _videos(staging, reports, labels)]
            write_page(staging, "compare.html", "Comparison: " + ", ".join(labels), body)
        return frame, md
    return frame, markdown([])


def _deltas(tables, labels, metrics, tolerance, latency_tolerance) -> tuple[pd.DataFrame, list[Regression]]:
    keys = list(dict.fromkeys(key for table in tables for key in table.index))
    rows, flags = [], []
    for key in keys:
        having = [table for table in tables if key in table.index]
        unchanged = len(having) > 1 and all("weights_id" in t for t in having) and \
            len({t.loc[key, "weights_id"] for t in having}) == 1
        for metric in metrics:
            row = dict(zip(KEY, key), metric=metric)
            first = None
            for table, label in zip(tables, labels):
                value = table.loc[key, metric] if key in table.index and metric in table else float("nan")
                row[label] = value
                if first is None:
                    if key in table.index:
                        first, first_table = value, table
                    continue
                delta = value - first
                row[f"delta {label}"] = delta
                worse = delta > 0 if metric in LOWER_IS_BETTER else delta < 0
                scale = 1.0 if metric in QUALITY else max(abs(first), 1e-12)
                limit = latency_tolerance if metric.endswith("_s") else tolerance
                noise = _spread(first_table, key, metric) + _spread(table, key, metric)
                if not unchanged and worse and abs(delta) / scale > limit and abs(delta) > noise:
                    flags.append(Regression(metric, key, label, first, value))
            rows.append(row)
    return pd.DataFrame(rows), flags


def wide_table(tables, labels, metrics, flags: list[Regression]) -> tuple[pd.DataFrame, list[bool]]:
    """One row per (report, model, sampler, steps), the metrics as columns; a row whose weights an earlier
    report already showed (the frozen teacher, the data) is shown once; regressed rows first."""
    rows, seen = [], set()
    for table, label in zip(tables, labels):
        for key, values in table.iterrows():
            same = (key, values.get("weights_id")) if "weights_id" in table else None
            if same is not None and same in seen:
                continue
            seen.add(same)
            hits = [f.metric for f in flags if f.key == key and f.label == label]
            rows.append({"checkpoint": label, **dict(zip(KEY, key)),
                         "regressed": ", ".join(hits), **{m: values.get(m) for m in metrics}})
    wide = pd.DataFrame(rows)
    wide["_order"] = wide["regressed"] == ""  # False (regressed) sorts first; the sort is stable
    wide = wide.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    return wide, list(wide["regressed"] != "")


def _videos(staging: Path, reports: list[Path], labels: list[str]) -> str:
    """Every report's preview columns in one grid (a column whose weights an earlier report showed: once),
    its files copied under web/<report>/."""
    rows, columns, seen = [], [], set()
    for index, (path, label) in enumerate(zip(reports, labels)):
        folder = _folder(Path(path))
        meta_file = folder / "meta.json"
        previews = json.loads(meta_file.read_text()).get("previews") if meta_file.is_file() else None
        if not previews:
            continue
        for row in previews["rows"]:
            if row not in rows:
                rows.append(row)
        for column in previews["columns"]:
            identity = (column["model"], column["sampler"], column["steps"], column.get("weights_id"))
            if identity in seen:
                continue
            seen.add(identity)
            files = {}
            for row, src in zip(previews["rows"], column["videos"]):
                if src and (folder / src).is_file():
                    target = Path("web") / f"{index:02d}" / src.removeprefix("web/")
                    (staging / target).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(folder / src, staging / target)
                    files[(row["prompt"], row["seed"])] = target.as_posix()
            rank = {"teacher": 1, "data": 2}.get(column["model"], 0)  # the students first, the data last
            columns.append({"title": column_title(column, None if rank else label), "files": files, "rank": rank})
    if not columns:
        return '<p class="muted">The reports hold no preview videos (made before report.html existed).</p>'
    columns.sort(key=lambda c: c["rank"])
    for column in columns:
        column["videos"] = [column["files"].get((r["prompt"], r["seed"])) for r in rows]
    return video_grid(rows, columns)


def _plot(out_dir: Path, tables, labels) -> list[str]:
    """The headline metrics of every (model, sampler, steps) per report, left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in ("adherence_all", "diversity", "sharpness", "fd_oracle", "latency_s")
               if any(c in t for t in tables)]
    if len(tables) < 2 or not columns:
        return []
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.2), squeeze=False)
    keys = list(dict.fromkeys(key for table in tables for key in table.index if key[0] != "data"))
    for ax, column in zip(axes[0], columns):
        for key in keys:
            values = [t.loc[key, column] if key in t.index and column in t else float("nan") for t in tables]
            ax.plot(range(len(tables)), values, marker="o", label=f"{key[0]} {key[1]}-{key[2]}")
        ax.set_xticks(range(len(tables)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(column)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=90)
    plt.close(fig)
    return ["compare.png"]


def _spread(table: pd.DataFrame, key: tuple, metric: str) -> float:
    values = [table.loc[key, c] for c in SPREADS.get(metric, []) if c in table and key in table.index]
    return float(sum(v for v in values if pd.notna(v)))


def is_comparison(folder: Path) -> bool:
    return (Path(folder) / "compare.md").is_file()


def read_report_table(path: Path) -> pd.DataFrame:
    """A report's table (a report folder, or its report.parquet), indexed by (model, sampler, steps)."""
    file = path / "report.parquet" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path}: not a benchmark report (no {file.name})" if path.exists() else
                         f"{path}: no such report folder or file")
    try:
        table = pd.read_parquet(file)
    except Exception as err:  # pyarrow's errors have no common base below Exception
        raise InputError(f"{file}: not a readable report table ({type(err).__name__})") from None
    missing = [c for c in (*KEY, "checkpoint") if c not in table.columns]
    if missing or table.empty:
        raise InputError(f"{file}: not a benchmark report table (missing {', '.join(missing) or 'rows'})")
    return table.set_index(KEY)


def _folder(path: Path) -> Path:
    """A report's folder, given the folder or its report.parquet."""
    return path if path.is_dir() else path.parent


def _run_label(path: Path, checkpoint: str) -> str:
    """`<run>/<checkpoint>` for a report in `<run>/bench/<checkpoint>/`, else the report's path."""
    folder = _folder(path)
    if folder.parent.name == "bench":
        return f"{folder.parent.parent.name}/{checkpoint}"
    return str(folder)
