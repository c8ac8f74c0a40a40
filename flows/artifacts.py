"""Prefect artifacts of the flows: each validation of a training run, each benchmark report, each comparison.

Keys start with the run's name (`run.name` of its config), so two runs (the demo, the nightly retraining)
never overwrite each other's, while each run's later results version its own keys. Floats are rounded.
"""

from __future__ import annotations

import base64
import json
import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from distill import registry
from distill.config import Config
from distill.run_layout import step_of
from distill.training.metrics import parse_metrics


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in "-".join(parts).lower()).strip("-")


def rounded(value):
    """4 significant digits for floats (lists too); other values as they are."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def publish_validations(cfg: Config, store, published: set[str]) -> None:
    """One markdown artifact per new validation folder (meta.json is its last file), and the metrics table up
    to that validation's step."""
    for key in sorted(store.list("validation")):
        if not key.endswith("meta.json") or key in published:
            continue
        published.add(key)
        meta = json.loads(store.get_text(key))
        folder = store.key_uri(key.rsplit("/", 1)[0])
        sheet = key.rsplit("/", 1)[0] + "/contact.png"  # inline: the UI shows it wherever the run's files live
        shown = f"![contact sheet]({_data_uri(store.get_bytes(sheet))})" if store.exists(sheet) else ""
        step = key.split("/")[1]
        rows = parse_metrics(store.get_text("metrics.jsonl")) if store.exists("metrics.jsonl") else []
        rows = [r for r in rows if r.get("step", 0) <= step_of(step)]
        latest = rows[-1] if rows else {}
        seconds = meta["seconds_per_video"]
        create_markdown_artifact(
            key=artifact_key(cfg.run.name, "validation"),
            description=f"{cfg.run.name} validation at {step}",
            markdown="\n".join([
                f"# {cfg.run.name}: validation at {step}", "",
                shown, "",
                f"Contact sheet: `{folder}/contact.png`", "",
                f"Sampler {meta['sampler_kind']}, timesteps {rounded(meta['timesteps'])}, guidance "
                f"{rounded(meta['guidance_scale'])}, {meta['function_evaluations_per_video']} evaluations per video, "
                f"{sum(seconds) / len(seconds):.3f} s per video.", "",
                "| prompt | seed | video |", "|---|---|---|",
                *[f"| {p} | {s} | `{folder}/{v}` |" for (p, s), v in
                  zip([(p, s) for p in meta["prompts"] for s in meta["seeds"]], meta["videos"])],
                "", f"Metrics at step {latest.get('step', '-')}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in latest.items() if isinstance(v, float)),
            ]),
        )
        if rows:
            losses = registry.get_method(cfg.method).cls.headline_losses
            keys = [k for k in ("step", *losses) if k in rows[-1]]
            create_table_artifact(key=artifact_key(cfg.run.name, "metrics"),
                                  table=[{k: rounded(r.get(k)) for k in keys} for r in rows[-50:]],
                                  description=f"{cfg.run.name} metrics up to {step}")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def inline_images(markdown: str, read_bytes) -> str:
    """Markdown whose relative PNG links (`![x](plot.png)`) carry the image itself as a data URI: the Prefect UI
    shows an artifact away from the files it sits beside (local or S3), so a relative link would not load."""
    def inline(match: re.Match) -> str:
        return f"![{match[1]}]({_data_uri(read_bytes(match[2]))})"

    return _IMAGE.sub(inline, markdown)


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)")


def publish_report(run: str, checkpoint: str, markdown: str, uri: str, read_bytes, page: str) -> None:
    """The report's markdown with its plots inline, and where its page with the videos is."""
    from distill.bench.report import PAGE_LINE  # pandas: loaded when a report is published, not with the flows

    markdown = inline_images(markdown, read_bytes).replace(PAGE_LINE, f"The videos side by side: `{page}`.")
    create_markdown_artifact(key=artifact_key(run, "bench", checkpoint.rstrip("/").rsplit("/", 1)[-1]),
                             markdown=markdown, description=f"benchmark of {uri}")


def publish_comparison(run: str, markdown: str, page: str, read_bytes) -> None:
    """The regressions, the side-by-side table and the plot of compare.md (its long table of deltas stays in the
    file), and where compare.html is."""
    from distill.bench.compare import DELTAS_HEADING

    summary = inline_images(markdown.split(DELTAS_HEADING)[0].rstrip(), read_bytes)
    link = f"[compare.html]({page})" if page.startswith(("http://", "https://")) else f"`{page}`"
    create_markdown_artifact(key=artifact_key(run, "comparison"),
                             markdown=f"{summary}\n\nThe videos side by side, the plots: {link}\n",
                             description=f"checkpoints side by side ({page})")
