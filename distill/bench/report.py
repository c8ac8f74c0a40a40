"""Benchmark reports: a table in parquet and CSV, a markdown summary, PNG plots, a page with the videos.

A report folder holds report.parquet / report.csv (one row per checkpoint, model, sampler,
steps), training.json (throughput, when measured), meta.json (card, versions, prompts, the index of
the preview videos), report.md and quality_vs_steps.png, latency_vs_steps.png, training_curves.png,
and report.html: the tables, the plots and the videos of every row side by side (web/, previews).
`distill.bench.compare` lines several reports up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from distill.bench.html import column_title, plots_html, table_html, video_grid, write_page

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
    _page(out_dir, table, meta, training, plots)
    return out_dir / "report.md"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def md_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


def _intro(meta: dict) -> list[str]:
    return [f"Card: {meta['card']}. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
            f"Videos: {len(meta['prompts'])} prompts x {len(meta['seeds'])} seeds at "
            f"{meta['size']['num_frames']}x{meta['size']['height']}x{meta['size']['width']}; "
            f"{meta['real_videos']} real videos for Fréchet distance and coverage"
            + (" (not computed: it needs two videos per model)." if len(meta["prompts"]) * len(meta["seeds"]) < 2
               else "."),
            f"Student weights: {'the EMA of the trained weights' if meta.get('weights') == 'ema' else 'as trained'}."]


def _title(meta: dict) -> str:
    return f"Benchmark: {meta['name']} (step {meta['step']}, {meta['method']})"


def _latency(table: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The latency table, and the student's speed-up over the teacher at its most steps (None without one)."""
    speed = [c for c in ["model", "weights", "sampler", "steps", "guidance", "nfe", "latency_s", "denoise_s", "decode_s"]
             if c in table]
    sampled = table[table["model"] != "data"]
    base = sampled[(sampled["model"] != sampled["model"].iloc[0])]
    said = None
    if len(base):
        ref = base.loc[base["steps"].idxmax()]
        student = sampled.iloc[0]
        said = (f"Speed-up of {student['model']} ({student['steps']} steps) over {ref['model']} "
                f"({ref['steps']} steps, CFG {ref['guidance']:g}): end to end "
                f"{ref['latency_s'] / student['latency_s']:.1f}x, denoising {ref['denoise_s'] / student['denoise_s']:.1f}x.")
    return sampled[speed], said


def _quality(table: pd.DataFrame) -> pd.DataFrame:
    return table[KEY + [c for c in table.columns if c in QUALITY or c.startswith("fd_") or c.endswith("_score")]]


PAGE_LINE = "The videos side by side: report.html in this folder."
"""report.md's pointer to its page (the flows' artifact names the page's full location instead)."""
DATA_ROW = ("The `data` row scores held-out real videos of the same prompts (as many per prompt as seeds) against the "
            "same reference set: the ceiling of adherence, the data's own diversity, and the Fréchet distance at this "
            "sample size between two real sets.")


def _markdown(table: pd.DataFrame, meta: dict, training: dict | None, plots: list[str]) -> str:
    latency, speedup = _latency(table)
    lines = [f"# {_title(meta)}", "", *_intro(meta), "",
             "## Latency (median seconds per video, warm-up excluded)", "", md_table(latency)]
    if speedup:
        lines += [speedup, ""]
    lines += ["## Quality (shapes-world oracle; fd_* lower is better)", "", md_table(_quality(table))]
    if "data" in set(table["model"]):
        lines += [DATA_ROW, ""]
    if training is not None:
        lines += ["## Training throughput", "", md_table(_training(training))]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", PAGE_LINE] if meta.get("previews") else []
    return "\n".join(lines) + "\n"


def _training(training: dict) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in training.items() if k != "rows"}])


def _page(out_dir: Path, table: pd.DataFrame, meta: dict, training: dict | None, plots: list[str]) -> None:
    """report.html: the videos first (what a person looks for), then the tables and the plots."""
    latency, speedup = _latency(table)
    body = ["".join(f"<p class=\"muted\">{line}</p>" for line in _intro(meta))]
    previews = meta.get("previews")
    if previews:
        columns = [{"title": column_title(c), "videos": c["videos"]} for c in previews["columns"]]
        body += ["<h2>Videos</h2>", video_grid(previews["rows"], columns)]
    body += ["<h2>Latency (median seconds per video, warm-up excluded)</h2>", table_html(latency)]
    body += [f"<p>{speedup}</p>"] if speedup else []
    body += ["<h2>Quality (shapes-world oracle; fd_* lower is better)</h2>", table_html(_quality(table))]
    body += [f"<p class=\"muted\">{DATA_ROW}</p>"] if "data" in set(table["model"]) else []
    if training is not None:
        body += ["<h2>Training throughput</h2>", table_html(_training(training))]
    body += ["<h2>Plots</h2>", *plots_html(plots)] if plots else []
    write_page(out_dir, "report.html", _title(meta), body)


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
            for (model, sampler), group in table.groupby(["model", "sampler"], sort=False):
                if model == "data":
                    if group[column].notna().any():
                        ax.axhline(group[column].iloc[0], color="grey", linestyle="--", label="data")
                    continue
                # a line per model and sampler: the teacher's ODE steps apart from its row as the student samples
                group = group.sort_values("steps")
                ax.plot(group["steps"], group[column], marker="o", label=f"{model} ({sampler})")
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
