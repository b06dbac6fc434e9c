"""Heatmaps and per-layer curves of a trace (matplotlib, written as PNG).

For each corrupted thing: a heatmap of the mean normalised indirect effect
over affected questions (layers on x; target x kind on y, n in each label) and,
per target, line plots of the mean indirect effect per layer with its 95%
bootstrap band, one line per kind. A null group (too few affected questions)
is never drawn as a curve.
Titles name the model and the config.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from vqa_constraints.files import atomic_path

KIND_COLOURS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        # No creation date or software tag, so reruns are byte-identical.
        fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})


def _title(document: dict, what: str) -> str:
    model = Path(document["model"]["name"]).name or document["model"]["name"]
    opts = document["options"]
    return f"{model} · {document['data']['config']} · {what}\ncorruption={opts['corruption']} window={opts['window']}"


def plot_all(document: dict, out: Path) -> list[Path]:
    """Write every plot for ``document`` (a trace_stats dict) into ``out``; return the paths."""
    groups = [g for g in document["groups"] if g["num_constraints"] == "all" and g["target"] != "position"]
    written = []
    for corrupted in sorted({g["corrupted"] for g in groups}):
        mine = [g for g in groups if g["corrupted"] == corrupted]
        written.append(heatmap(document, mine, out / f"heatmap_{_slug(corrupted)}.png", corrupted))
        for target in sorted({g["target"] for g in mine}):
            curves = [g for g in mine if g["target"] == target]
            written.append(curve_plot(document, curves, out / f"curve_{_slug(corrupted)}_{_slug(target)}.png",
                                      f"{corrupted} corrupted, restored at {target}"))
    return written


def heatmap(document: dict, groups: list[dict], path: Path, corrupted: str) -> Path:
    """Null groups (too few affected questions) are blank rows labelled "null"; cells whose restoration
    copies back the corrupted token itself (layer 0 at a corrupted position) are marked "self"."""
    layers = document["model"]["num_layers"]
    labels = [f"{g['target']} · {g['kind']} (" + (f"null, n_affected={g['n_affected']}" if g["null"] else f"n={g['n_affected']}") + ")"
              for g in groups]
    values = np.array([[np.nan] * layers if g["null"] else [np.nan if v is None else v for v in g["mean_normalised"]]
                       for g in groups], dtype=float)
    fig = Figure(figsize=(max(5, 0.35 * values.shape[1] + 3), 0.45 * len(labels) + 1.6))
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", cmap="Purples", vmin=min(0.0, np.nanmin(values)) if np.isfinite(values).any() else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("layer")
    ax.set_xticks(range(values.shape[1]))
    for row, g in enumerate(groups):
        for layer in g["restores_corrupted_layers"]:
            ax.text(layer, row, "self", ha="center", va="center", fontsize=6, color="tab:orange")
    ax.set_title(_title(document, f"{corrupted} corrupted: mean normalised indirect effect over affected questions"
                        + ("\nself: restores the corrupted token itself" if any(g["restores_corrupted_layers"] for g in groups) else "")),
                 fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    _save(fig, path)
    return path


def curve_plot(document: dict, groups: list[dict], path: Path, what: str) -> Path:
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    for g in groups:
        if g["null"]:  # never a curve from too few affected questions
            ax.plot([], [], color=KIND_COLOURS.get(g["kind"]), label=f"{g['kind']}: null (n affected={g['n_affected']})")
            continue
        layers = np.arange(len(g["mean_effect"]))
        colour = KIND_COLOURS.get(g["kind"])
        ax.plot(layers, g["mean_effect"], marker="o", ms=3, color=colour, label=f"{g['kind']} (n={g['n_affected']} affected)")
        ax.fill_between(layers, g["ci_low"], g["ci_high"], color=colour, alpha=0.2)
        for layer in g["restores_corrupted_layers"]:
            ax.annotate("restores the corrupted token itself", (layer, g["mean_effect"][layer]), fontsize=6,
                        color=colour, xytext=(4, -10), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("indirect effect on p(answer)")
    ax.set_title(_title(document, what), fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def plot_examples(document: dict, rows: list[dict], out: Path, limit: int = 3) -> list[Path]:
    """Paper-style heatmaps for the first ``limit`` traced questions: every text token (y) x layer (x),
    one panel per kind, colour = p(answer) after restoring that single state."""
    written = []
    ids = list(dict.fromkeys(r["id"] for r in rows if r["target"] == "position"))[:limit]
    for record_id in ids:
        mine = [r for r in rows if r["id"] == record_id and r["target"] in ("position", "last token")]
        for corrupted in sorted({r["corrupted"] for r in mine}):
            cells = [r for r in mine if r["corrupted"] == corrupted]
            kinds = list(dict.fromkeys(r["kind"] for r in cells))
            fig = Figure(figsize=(4.6 * len(kinds), 0.28 * len(cells) / len(kinds) + 1.8), layout="constrained")
            axes = fig.subplots(1, len(kinds), squeeze=False)
            for ax, kind in zip(axes[0], kinds):
                ordered = sorted((r for r in cells if r["kind"] == kind), key=lambda r: r["target_positions"][0])
                values = np.array([r["p_restored"] for r in ordered])
                image = ax.imshow(values, aspect="auto", cmap={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}.get(kind))
                ax.set_yticks(range(len(ordered)), [r["target_text"].strip() or "·" for r in ordered], fontsize=7)
                ax.set_xlabel("layer")
                ax.set_xticks(range(values.shape[1]))
                ax.set_title(f"{kind} restored", fontsize=9)
                fig.colorbar(image, ax=ax, fraction=0.05)
            fig.suptitle(_title(document, f"{record_id}: {corrupted} corrupted, p(answer) per restored state"), fontsize=9)
            path = out / f"example_{_slug(record_id)}_{_slug(corrupted)}.png"
            _save(fig, path)
            written.append(path)
    return written
