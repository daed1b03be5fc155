"""The result layout: source | synthetic | reference over the difference maps, linked views."""

from __future__ import annotations

import xml.sax.saxutils as saxutils
from collections.abc import Sequence
from typing import Any

from .results import ResultNodes

# ---------------------------------------------------------------------------------------------
# result layout
# ---------------------------------------------------------------------------------------------
#: Custom layout ID of the result layout (registered on the scene's layout node).
RESULT_LAYOUT_ID = 8701
#: View (slice node layout name) -> (label in the view bar, colour) of the result layout.
RESULT_VIEWS = {
    "MedTranslateSource": ("Src", "#808080"),
    "MedTranslateSynthetic": ("Syn", "#2E8B57"),
    "MedTranslateReference": ("Ref", "#4169E1"),
    "MedTranslateDifference": ("dSrc", "#C0392B"),
    "MedTranslateReferenceDifference": ("dRef", "#8E44AD"),
    "MedTranslateUncertainty": ("Unc", "#E67E22"),
}


def result_view_assignments(nodes: ResultNodes, source_node: Any, reference_node: Any | None = None
                            ) -> list[list[tuple[str, str, str | None, float]]]:
    """Rows of ``(view name, background node ID, foreground node ID, foreground opacity)``: source |
    synthetic | reference on top, the heatmaps below. The synthetic view has the source difference
    as a foreground overlay at opacity 0 (raise it with the view's opacity slider)."""
    top = [("MedTranslateSource", source_node.GetID(), None, 0.0),
           ("MedTranslateSynthetic", nodes.synthetic.GetID(), nodes.difference.GetID(), 0.0)]
    if reference_node is not None:
        top.append(("MedTranslateReference", reference_node.GetID(), None, 0.0))
    bottom = [("MedTranslateDifference", nodes.difference.GetID(), None, 0.0)]
    if nodes.reference_difference is not None:
        bottom.append(("MedTranslateReferenceDifference", nodes.reference_difference.GetID(), None, 0.0))
    if nodes.uncertainty is not None:
        bottom.append(("MedTranslateUncertainty", nodes.uncertainty.GetID(), None, 0.0))
    return [top, bottom]


def result_layout_xml(rows: Sequence[Sequence[str]], orientation: str = "Axial") -> str:
    """Slicer layout XML: one horizontal row of slice views per entry of ``rows`` (view names)."""
    parts = ['<layout type="vertical">']
    for row in rows:
        parts.append(' <item>\n  <layout type="horizontal">')
        for view in row:
            label, color = RESULT_VIEWS.get(view, (view[:4], "#808080"))
            q = saxutils.quoteattr
            parts.append(
                f'   <item>\n    <view class="vtkMRMLSliceNode" singletontag={q(view)}>\n'
                f'     <property name="orientation" action="default">{saxutils.escape(orientation)}</property>\n'
                f'     <property name="viewlabel" action="default">{saxutils.escape(label)}</property>\n'
                f'     <property name="viewcolor" action="default">{saxutils.escape(color)}</property>\n'
                f'    </view>\n   </item>')
        parts.append('  </layout>\n </item>')
    parts.append('</layout>')
    return "\n".join(parts)


def show_results(scene: Any, nodes: ResultNodes, source_node: Any, reference_node: Any | None = None) -> list[str]:
    """Switch the layout to the result layout and put the volumes in its views, all slice views
    linked. Returns the names of the views that were filled (their slice composite nodes exist:
    in Slicer the layout manager creates them when the layout is set). No layout node (plain
    MRML without one): nothing happens, [] is returned."""
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is None:
        return []
    rows = result_view_assignments(nodes, source_node, reference_node)
    xml = result_layout_xml([[view for view, *_ in row] for row in rows])
    if layout.IsLayoutDescription(RESULT_LAYOUT_ID):
        layout.SetLayoutDescription(RESULT_LAYOUT_ID, xml)  # also updates the views when it is shown
    else:
        layout.AddLayoutDescription(RESULT_LAYOUT_ID, xml)
    layout.SetViewArrangement(RESULT_LAYOUT_ID)
    wanted = {view: rest for row in rows for view, *rest in row}
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    filled = []
    for i in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(i)
        name = composite.GetLayoutName()
        if name not in wanted:
            continue
        background, foreground, opacity = wanted[name]
        composite.SetBackgroundVolumeID(background)
        composite.SetForegroundVolumeID(foreground)
        composite.SetForegroundOpacity(opacity)
        composite.SetLinkedControl(True)
        filled.append(name)
    return filled
