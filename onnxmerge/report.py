"""Writing reports: JSON and text written atomically beside their target, and their text forms."""

from __future__ import annotations

import json
import os
from .errors import OnnxMergeError
from .io import write_atomically


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON; the file appears complete or not at all."""
    def dump(temporary: str) -> None:
        with open(temporary, "w") as stream:
            json.dump(data, stream, indent=2, default=float)

    write_atomically(path, dump, "report")


def write_text(text: str, path: str | os.PathLike, what: str) -> None:
    """Write ``text`` (UTF-8); the file appears complete or not at all."""
    def dump(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)

    write_atomically(path, dump, what)


def render_alignment(report: dict) -> str:
    """The text form of ``onnxmerge align``: per model and stage, the deep block each position takes."""
    lines = [f"method {report['method']}; deepest model {report['deep']} "
             f"({report['units'][report['deep']]} blocks, stages {report['stages'][report['deep']]})"]
    for name, stages in report["maps"].items():
        total = sum(s["objective"] or 0 for s in stages)
        lines.append(f"{name}: {report['units'][name]} blocks, stages {report['stages'][name]}, objective {total:.4f}")
        for stage in stages:
            placed = " ".join(f"{l}<-{'id' if k is None else k}" for l, k in zip(stage["deep_units"], stage["map"]))
            objective = "" if stage["objective"] is None else f"  objective {stage['objective']:.4f}"
            lines.append(f"  stage {stage['stage']}: {placed}{objective}")
        if name in report.get("cka", {}):
            lines.append(f"  CKA (rows: {report['deep']} blocks, columns: {name} blocks)")
            lines.extend("    " + " ".join("undef" if v is None else f"{v:5.2f}" for v in row)
                         for row in report["cka"][name])
            if any(v is None for row in report["cka"][name] for v in row):
                lines.append("  undef: CKA undefined (the block output does not vary over the samples)")
    return "\n".join(lines)


def plot_alignment(alignment, path: str | os.PathLike) -> None:
    """Heatmaps like Xu et al.'s Figure 3: each model's self-CKA, and the cross-CKA with the
    deepest model before and after alignment (after: each deep position against what the lifted
    model computes there, the aligned block or the identity's input). Written atomically."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OnnxMergeError("--plot needs matplotlib: pip install 'onnxmerge[plot]'") from None
    if alignment.cka is None:
        raise OnnxMergeError("--plot needs CKA: use --method sma or lma with --calib DATA")
    deep, others = alignment.deep, [i for i in range(len(alignment.names)) if i != alignment.deep]
    names = [os.path.basename(n) for n in alignment.names]
    panels = [(f"self-CKA {names[i]}", alignment.cross(i, i), names[i], names[i]) for i in range(len(names))]
    for i in others:
        cross = alignment.cross(deep, i)
        panels.append(("cross-CKA before alignment", cross, names[deep], names[i]))
        panels.append(("cross-CKA after alignment", cross[:, _effective_sources(alignment.maps[i])],
                       names[deep], f"{names[i]} lifted"))
    figure, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.3), squeeze=False)
    for axis, (title, matrix, rows, columns) in zip(axes[0], panels):
        image = axis.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="lower")
        axis.set_title(title, fontsize=8)
        axis.set_ylabel(f"{rows} block", fontsize=7)
        axis.set_xlabel(f"{columns} block", fontsize=7)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    try:
        write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight"),
                         "plot")
    finally:
        plt.close(figure)


def _effective_sources(mapping: list[int | None]) -> list[int]:
    """For each deep position, the model's unit whose output the lifted model has there."""
    sources, last = [], 0
    for unit in mapping:
        last = last if unit is None else unit
        sources.append(last)
    return sources
