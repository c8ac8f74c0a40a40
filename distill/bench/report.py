"""Benchmark reports: a table in parquet and CSV, a markdown summary, PNG plots; and comparisons.

A report folder holds report.parquet / report.csv (one row per checkpoint, model, sampler,
steps), training.json (throughput, when measured), meta.json (card, versions, prompts),
report.md and quality_vs_steps.png, latency_vs_steps.png, training_curves.png.
`compare` lines several reports up by (model, sampler, steps), with deltas against the first
and regressions flagged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from distill.errors import InputError
from distill.outputs import check_output_folder, staged_folder

QUALITY = ["adherence_colour", "adherence_shape", "adherence_direction", "adherence_all", "motion_consistency",
           "sharpness", "diversity", "coverage"]
LOWER_IS_BETTER = {"latency_s", "denoise_s", "decode_s", "fd_oracle"}
KEY = ["model", "sampler", "steps"]


def is_report(folder: Path) -> bool:
    """Whether `folder` holds a benchmark report (which a new report of the same place may replace)."""
    return (Path(folder) / "report.md").is_file()


def write_report(out_dir: Path, rows: list[dict], meta: dict, training: dict | None = None,
                 metrics_history: list[dict] | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table["card"] = meta["card"]
    table.to_parquet(out_dir / "report.parquet", index=False)
    table.to_csv(out_dir / "report.csv", index=False)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    if training is not None:
        (out_dir / "training.json").write_text(json.dumps(training, indent=2))
    plots = _plots(out_dir, table, metrics_history, meta.get("headline_losses", []))
    (out_dir / "report.md").write_text(_markdown(table, meta, training, plots))
    return out_dir / "report.md"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _md_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


def _markdown(table: pd.DataFrame, meta: dict, training: dict | None, plots: list[str]) -> str:
    lines = [f"# Benchmark: {meta['name']} (step {meta['step']}, {meta['method']})", "",
             f"Card: {meta['card']}. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
             f"Videos: {len(meta['prompts'])} prompts x {len(meta['seeds'])} seeds at "
             f"{meta['size']['num_frames']}x{meta['size']['height']}x{meta['size']['width']}; "
             f"{meta['real_videos']} real videos for Fréchet distance and coverage"
             + (" (not computed: it needs two videos per model)." if len(meta["prompts"]) * len(meta["seeds"]) < 2
                else "."),
             f"Student weights: {'the EMA of the trained weights' if meta.get('weights') == 'ema' else 'as trained'}.",
             ""]
    speed = [c for c in ["model", "weights", "sampler", "steps", "guidance", "nfe", "latency_s", "denoise_s", "decode_s"]
             if c in table]
    sampled = table[table["model"] != "data"]
    lines += ["## Latency (median seconds per video, warm-up excluded)", "", _md_table(sampled[speed])]
    base = sampled[(sampled["model"] != sampled["model"].iloc[0])]
    if len(base):
        ref = base.loc[base["steps"].idxmax()]
        student = sampled.iloc[0]
        lines += [f"Speed-up of {student['model']} ({student['steps']} steps) over {ref['model']} "
                  f"({ref['steps']} steps, CFG {ref['guidance']:g}): end to end "
                  f"{ref['latency_s'] / student['latency_s']:.1f}x, denoising {ref['denoise_s'] / student['denoise_s']:.1f}x.", ""]
    quality = KEY + [c for c in table.columns if c in QUALITY or c.startswith("fd_") or c.endswith("_score")]
    lines += ["## Quality (shapes-world oracle; fd_* lower is better)", "", _md_table(table[quality])]
    if "data" in set(table["model"]):
        lines += ["The `data` row scores held-out real videos of the same prompts (as many per prompt as seeds) "
                  "against the same reference set: the ceiling of adherence, the data's own diversity, and the "
                  "Fréchet distance at this sample size between two real sets.", ""]
    if training is not None:
        keep = {k: v for k, v in training.items() if k != "rows"}
        lines += ["## Training throughput", "", _md_table(pd.DataFrame([keep]))]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(out_dir: Path, table: pd.DataFrame, history: list[dict] | None, losses: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, columns in (("quality_vs_steps.png", ["adherence_all", "sharpness", "diversity", "coverage"]),
                          ("latency_vs_steps.png", ["latency_s", "denoise_s"])):
        columns = [c for c in columns if c in table]
        fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.2), squeeze=False)
        for ax, column in zip(axes[0], columns):
            for model, group in table.groupby("model"):
                if model == "data":
                    if group[column].notna().any():
                        ax.axhline(group[column].iloc[0], color="grey", linestyle="--", label="data")
                    continue
                group = group.sort_values("steps")
                ax.plot(group["steps"], group[column], marker="o", label=model)
            ax.set_xscale("log")
            ax.set_xlabel("steps")
            ax.set_title(column)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        made.append(name)
    if history:
        curves = pd.DataFrame(history)
        columns = [c for c in losses if c in curves]
        if columns:
            fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.2), squeeze=False)
            for ax, column in zip(axes[0], columns):
                rows = curves.dropna(subset=[column])
                ax.plot(rows["step"], rows[column])
                ax.set_xlabel("step")
                ax.set_title(column)
            fig.tight_layout()
            fig.savefig(out_dir / "training_curves.png", dpi=90)
            plt.close(fig)
            made.append("training_curves.png")
    return made


def compare(reports: list[Path], out_dir: Path | None = None, tolerance: float = 0.02,
            latency_tolerance: float = 0.10) -> tuple[pd.DataFrame, str]:
    """Line reports up by (model, sampler, steps): each metric per report, its delta against the
    first report that has the row, and a regression flag where a later report is worse by more
    than `tolerance` (absolute for fractions in [0, 1], else relative), or, for timings, by more than
    `latency_tolerance` (relative) and more than the two reports' spreads of that timing together.
    A row whose weights are the same in every report (the frozen teacher, the data) is never flagged."""
    if not reports:
        raise InputError("compare: no reports given; pass at least one report folder")
    tables = [read_report_table(Path(path)) for path in reports]
    if out_dir is not None:
        check_output_folder(out_dir, what="comparison folder", how="empty it", replaceable=is_comparison)
    labels = [str(table["checkpoint"].iloc[0]) for table in tables]
    if len(set(labels)) < len(labels):  # same checkpoint names from different runs: <run>/<checkpoint>
        labels = [_run_label(Path(p), label) for p, label in zip(reports, labels)]
    metrics = [c for c in tables[0].columns if c in QUALITY or c in LOWER_IS_BETTER or c.startswith(("fd_", "clip"))]
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
                    flags.append(f"{metric} of {key[0]} {key[1]} {key[2]}-step: {first:.4g} -> {value:.4g} in {label}")
            rows.append(row)
    frame = pd.DataFrame(rows)
    md = "# Comparison\n\n" + _md_table(frame) + "\n## Regressions\n\n" + \
        ("".join(f"- {f}\n" for f in flags) if flags else "None beyond the tolerance.\n")
    if out_dir is not None:
        with staged_folder(out_dir) as staging:
            frame.to_parquet(staging / "compare.parquet", index=False)
            frame.to_csv(staging / "compare.csv", index=False)
            (staging / "compare.md").write_text(md)
            (staging / "regressions.json").write_text(json.dumps(flags, indent=2))
    return frame, md


SPREADS = {"latency_s": ["latency_spread_s"], "denoise_s": ["denoise_spread_s"],
           "decode_s": ["latency_spread_s", "denoise_spread_s"]}
"""The spread columns (max - min over a report's videos) that bound a timing's run-to-run noise."""


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


def _run_label(path: Path, checkpoint: str) -> str:
    """`<run>/<checkpoint>` for a report in `<run>/bench/<checkpoint>/`, else the report's path."""
    folder = path if path.is_dir() else path.parent
    if folder.parent.name == "bench":
        return f"{folder.parent.parent.name}/{checkpoint}"
    return str(folder)
