"""Render docs/result_layout.png: what the Slicer module's result layout shows, on a phantom case.

Everything up to the pixels goes through the module's own MRML code with real MRML (slicer-core):
the phantom case is added to a scene as the "Load sample data" button does, translated with the
bundled demo model as Apply does, and the result layout is set up by ``mrml.show_results``. Each
panel then shows the volume that layout puts in that slice view, with the window/level and colour
table of its display node, and the liver/tumor segment outlines (Slicer shows segmentations in
every view). Only the drawing is matplotlib instead of Slicer's renderer.

    .venv/bin/python docs/render_result_layout.py [--model pix2pix_ct_cta_demo] [--out docs/result_layout.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TITLES = {
    "MedTranslateSource": "source",
    "MedTranslateSynthetic": "synthetic (difference overlay at opacity 0)",
    "MedTranslateReference": "reference (real CTA)",
    "MedTranslateDifference": "difference: synthetic − source",
    "MedTranslateReferenceDifference": "difference: synthetic − reference",
    "MedTranslateUncertainty": "uncertainty",
}


def _colors(scene, node, values: np.ndarray) -> np.ndarray:
    """RGB of ``values`` through the node's display window/level and colour table (grey if none)."""
    display = node.GetDisplayNode()
    window, level = display.GetWindow(), display.GetLevel()
    t = np.clip((values - (level - window / 2.0)) / window, 0.0, 1.0)
    color_node = scene.GetNodeByID(display.GetColorNodeID() or "")
    if color_node is None:
        return np.repeat(t[..., None], 3, axis=-1)
    lut = color_node.GetLookupTable()
    table = np.array([lut.GetTableValue(i)[:3] for i in range(lut.GetNumberOfTableValues())])
    return table[np.rint(t * (len(table) - 1)).astype(int)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pix2pix_ct_cta_demo")
    parser.add_argument("--out", default=str(Path(__file__).with_name("result_layout.png")))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import slicer
    from matplotlib.colors import ListedColormap, Normalize

    from MedTranslateLib import mrml, phantom

    scene = slicer.vtkMRMLScene()
    case = phantom.generate_case(phantom.case_seed(0, args.seed), phantom.PhantomConfig(tumor_count=(1, 3)))
    sample = mrml.add_phantom_case(scene, case, prefix=f"Phantom {args.seed}")
    options = mrml.TranslationOptions(model=args.model, device="cpu", seed=0)
    nodes = mrml.translate_nodes(scene, sample.source, options, liver=(sample.segmentation, "liver"),
                                 tumor=(sample.segmentation, "tumor"), reference_node=sample.reference)

    # The result layout, as in Slicer (there the layout manager creates the slice composite nodes).
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    for view in mrml.RESULT_VIEWS:
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        scene.AddNode(composite)
    mrml.show_results(scene, nodes, sample.source, sample.reference)
    rows = mrml.result_view_assignments(nodes, sample.source, sample.reference)

    tumor = case.masks["tumor"].array > 0.5
    liver = case.masks["liver"].array > 0.5
    z = int(np.argmax(tumor.sum(axis=(1, 2)))) if tumor.any() else int(np.argmax(liver.sum(axis=(1, 2))))
    columns = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.4 * columns, 3.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row):
                continue
            view, background, _foreground, _opacity = row[c]
            node = scene.GetNodeByID(background)
            volume = mrml.volume_from_node(node)
            image = volume.array[z]
            ax.imshow(_colors(scene, node, image), interpolation="nearest")  # row 0 anterior, column 0 patient right
            if r == 0:
                ax.contour(liver[z], levels=[0.5], colors=[mrml._SEGMENT_COLORS["liver"]], linewidths=0.8)
                ax.contour(tumor[z], levels=[0.5], colors=[mrml._SEGMENT_COLORS["tumor"]], linewidths=0.8)
            label = mrml.RESULT_VIEWS[view][0]
            name = node.GetName()
            if " – " in name:  # result nodes: "<source> – synthetic <target> (<method>)[ – ...]"
                name = name.split(" – ")[1]
            ax.set_title(f"[{label}] {TITLES[view]}" + (f"\n{name}" if r == 0 else ""), fontsize=8)
            display = node.GetDisplayNode()
            color_node = scene.GetNodeByID(display.GetColorNodeID() or "")
            if r > 0 and color_node is not None:
                lut = color_node.GetLookupTable()
                cmap = ListedColormap([lut.GetTableValue(i)[:3] for i in range(lut.GetNumberOfTableValues())])
                lo = display.GetLevel() - display.GetWindow() / 2
                bar = fig.colorbar(plt.cm.ScalarMappable(Normalize(lo, lo + display.GetWindow()), cmap), ax=ax,
                                   fraction=0.046, pad=0.02)
                bar.set_label("HU", fontsize=7)
                bar.ax.tick_params(labelsize=6)
    table = mrml.metrics_summary(nodes.metrics, "HU")
    fig.suptitle("MedTranslate result layout (linked axial views): source | synthetic | reference over the "
                 "difference heatmaps\nSynthetic images are NOT for diagnosis", fontsize=9)
    fig.text(0.01, 0.005, "Metrics table (synthetic vs. reference):\n" + table, fontsize=6.5, family="monospace",
             va="bottom")
    fig.subplots_adjust(left=0.02, right=0.96, top=0.86, bottom=0.13, wspace=0.25, hspace=0.3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"{out} ({out.stat().st_size // 1024} KB), slice z={z}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
