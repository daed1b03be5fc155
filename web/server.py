"""MedTranslate in a browser: real Slicer slice views (trame-slicer) over the application layer.

    web/.venv/bin/python web/server.py [--port 8080] [--host 127.0.0.1]

Load the phantom sample case or upload a volume (read on a worker thread), pick a model, Run (a
``runner.TranslationProcess``: ``app.run_translation`` in a process of its own, polled, so the
page never waits on the model; Cancel ends it at once), then
the result layout: source | synthetic | reference over the difference and uncertainty maps, all
views linked, the metrics table and the per-slice confidence, and the synthetic as NIfTI.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from session import (  # noqa: E402
    LoadedCase,
    confidence_rows,
    device_items,
    metrics_rows,
    model_items,
    read_upload,
    result_file_name,
    result_nifti,
    sample_case,
    start,
)
from trame.app import TrameApp  # noqa: E402
from trame.app.file_upload import ClientFile  # noqa: E402
from trame.widgets import client, html  # noqa: E402
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout  # noqa: E402
from trame_vuetify.widgets import vuetify3 as v  # noqa: E402

from MedTranslateLib import app  # noqa: E402

log = logging.getLogger("medtranslate.web")

NOT_FOR_DIAGNOSIS = ("Research software. Synthetic images can look plausible and still be wrong: "
                     "NOT FOR DIAGNOSIS.")
#: Window/level presets (window, level) for the source, synthetic and reference views.
WINDOW_PRESETS = {"Abdomen (W400 L40)": (400.0, 40.0), "Angio (W700 L200)": (700.0, 200.0),
                  "Wide (W2000 L0)": (2000.0, 0.0), "Bone (W1500 L450)": (1500.0, 450.0)}
POLL_SECONDS = 0.2


def _result_layout():
    """Two rows of axial slice views, named as the Slicer module's result layout (``mrml.layout``)."""
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

    from MedTranslateLib.mrml.layout import RESULT_VIEWS

    def view(name: str):
        label, color = RESULT_VIEWS[name]
        definition = ViewLayoutDefinition.slice_view("Axial", label=label, color=color)
        definition.singleton_tag = name
        return definition

    top = ["MedTranslateSource", "MedTranslateSynthetic", "MedTranslateReference"]
    bottom = ["MedTranslateDifference", "MedTranslateReferenceDifference", "MedTranslateUncertainty"]
    return Layout(LayoutDirection.Vertical, [Layout(LayoutDirection.Horizontal, [view(n) for n in top]),
                                             Layout(LayoutDirection.Horizontal, [view(n) for n in bottom])])


class MedTranslateWeb(TrameApp):
    def __init__(self, server=None):
        super().__init__(server=server)
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layout_manager.register_layout("result", _result_layout())
        self.layout_manager.set_layout("result")
        self.loaded: LoadedCase | None = None
        self.case_nodes: list[Any] = []
        self.result_nodes: list[Any] = []
        self.result: Any = None
        self.job: Any = None
        self.downloads = Path(tempfile.mkdtemp(prefix="medtranslate-web-results-"))
        self._linking = False
        for view in self.slicer.view_manager.get_slice_views():
            view.modified.connect(self._link_slices)
        self._init_state()
        self._build_ui()
        self.ctrl.on_server_ready.add(self._ask_devices)

    def _ask_devices(self, **_) -> None:
        """Every GPU by name, asked of a short process (the server itself imports no torch)."""
        asyncio.ensure_future(self._poll_devices())

    async def _poll_devices(self) -> None:
        from MedTranslateLib.runner import DeviceQuery

        query = DeviceQuery().start()
        while (answer := query.poll()) is None:
            await asyncio.sleep(POLL_SECONDS)
        if query.error:
            log.warning("%s", query.error)
        with self.state:
            self.state.devices = device_items(answer)

    # -- state -----------------------------------------------------------------------------------
    def _init_state(self) -> None:
        from MedTranslateLib.runner import DEFAULT_DEVICE_CHOICES

        s = self.state
        s.case_label, s.message, s.message_type = "No case loaded", "", "info"
        s.models, s.model, s.model_caps, s.stochastic, s.units = [], None, "", False, ""
        s.result_caption = ""
        s.steps, s.samples, s.seed, s.roi_only = "", "1", "0", False
        s.devices = device_items(DEFAULT_DEVICE_CHOICES)  # until the device query answers
        s.device = "auto"
        s.running, s.progress, s.progress_text = False, 0, ""
        s.metrics_rows, s.confidence_rows, s.has_result, s.result_file = [], [], False, "synthetic.nii.gz"
        s.window_presets, s.window_preset = list(WINDOW_PRESETS), None
        s.busy_loading = False

    def _say(self, text: str, kind: str = "info") -> None:
        self.state.message, self.state.message_type = text, kind

    # -- case --------------------------------------------------------------------------------------
    async def load_sample(self) -> None:
        await self._load(sample_case)

    async def load_upload(self, files: list[dict] | None) -> None:
        if not files:
            return
        file = ClientFile(files[0])
        await self._load(lambda: read_upload(file.name, file.content))

    async def _load(self, read) -> None:
        """Read a case on a worker thread (a large upload or the phantom takes seconds), then show it."""
        if self.state.running or self.state.busy_loading:
            self._say("Busy: wait for the current load or cancel the translation first.", "warning")
            return
        with self.state:
            self.state.busy_loading = True
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(None, read)
        except (app.UserError, ValueError, OSError, KeyError, MemoryError) as exc:
            with self.state:
                self.state.busy_loading = False
                self._say(app.readable_error(exc), "error")  # the page keeps the case it had
            return
        with self.state:
            self.state.busy_loading = False
            self.loaded = loaded
            self._show_case()
            self.state.case_label = loaded.label
            self.state.models = model_items(loaded.modality)
            usable = [m for m in self.state.models if not m["disabled"]]
            self.state.model = usable[0]["value"] if usable else None
            self._say(f"Loaded. {len(usable)} model(s) fit this case.", "success")

    def _show_case(self) -> None:
        from MedTranslateLib.mrml.nodes import add_volume_node

        self._clear_nodes(self.result_nodes + self.case_nodes)
        self.result_nodes, self.result = [], None
        self.state.update({"metrics_rows": [], "confidence_rows": [], "has_result": False})
        scene, case = self.slicer.scene, self.loaded.case
        source = add_volume_node(scene, case.source, f"{case.name} – source")
        self.case_nodes = [source]
        if case.reference is not None:
            self.case_nodes.append(add_volume_node(scene, case.reference, f"{case.name} – reference"))
        views = {"MedTranslateSource": source.GetID(),
                 "MedTranslateReference": self.case_nodes[1].GetID() if case.reference is not None else None}
        self._assign_views([[(name, node, None, 0.0) for name, node in views.items()]])
        self._apply_window(self.state.window_preset)

    def _clear_nodes(self, nodes: list[Any]) -> None:
        for view in self.slicer.view_manager.get_slice_views():
            view.set_background_volume_id(None)
            view.set_foreground_volume_id(None)
        for node in nodes:
            if node is not None and self.slicer.scene.IsNodePresent(node):
                self.slicer.scene.RemoveNode(node)

    def _assign_views(self, rows) -> None:
        for row in rows:
            for name, background, foreground, opacity in row:
                view = self.slicer.view_manager.get_view(name)
                if view is None:
                    continue
                view.set_background_volume_id(background)
                view.set_foreground_volume_id(foreground)
                view.set_foreground_opacity(opacity)
        for view in self.slicer.view_manager.get_slice_views():
            view.fit_view_to_content()

    def _link_slices(self, changed) -> None:
        """Linked slices: moving one view's slice moves every other view to the same position."""
        if self._linking:
            return
        self._linking = True
        try:
            value = changed.get_slice_value()
            for view in self.slicer.view_manager.get_slice_views():
                if view is not changed and abs(view.get_slice_value() - value) > 1e-6:
                    view.set_slice_value(value)
        finally:
            self._linking = False

    def _apply_window(self, preset: str | None) -> None:
        from trame_slicer.core import VolumeWindowLevel

        if preset not in WINDOW_PRESETS:
            return
        nodes = list(self.case_nodes)
        if self.result_nodes:
            nodes.append(self.result_nodes[0])  # the synthetic volume
        for node in nodes:
            VolumeWindowLevel.set_volume_node_window_level(node, *WINDOW_PRESETS[preset])

    # -- run -----------------------------------------------------------------------------------------
    def _options(self) -> app.TranslationOptions:
        def whole(text: Any, what: str, default: int | None) -> int | None:
            text = str(text if text is not None else "").strip()
            if not text:
                return default
            try:
                return int(text)
            except ValueError:
                raise app.UserError(f"{what} must be a whole number, got {text!r}") from None

        s = self.state
        stochastic = bool(s.stochastic)
        return app.TranslationOptions(
            model=s.model, device=s.device or "auto", seed=whole(s.seed, "the seed", None),
            steps=whole(s.steps, "sampling steps", None) if stochastic else None,
            num_samples=whole(s.samples, "the number of samples", 1) if stochastic else 1,
            slices=app.ALL_ROIS if s.roi_only else None)

    def run(self) -> None:
        if self.state.running or self.state.busy_loading:
            return
        if self.loaded is None or not self.state.model:
            self._say("Load a case and pick a model first.", "warning")
            return
        try:
            options = self._options()
        except app.UserError as exc:
            self._say(app.readable_error(exc), "error")
            return
        self.job = start(self.loaded, options)
        self.state.update({"running": True, "progress": 0, "progress_text": "Starting…"})
        self._say("Running…", "info")
        asyncio.ensure_future(self._poll(self.job, options))

    def close(self) -> None:
        """At exit: end a running translation process, remove the download folder."""
        self.cancel()
        shutil.rmtree(self.downloads, ignore_errors=True)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.state.progress_text = "Cancelling…"

    async def _poll(self, job, options: app.TranslationOptions) -> None:
        from MedTranslateLib.worker import JobState

        while not job.finished:
            await asyncio.sleep(POLL_SECONDS)
            job.poll()
            with self.state:
                progress = job.progress
                self.state.progress = round(100 * progress.fraction)
                self.state.progress_text = progress.text()
        state = job.poll()
        with self.state:
            self.state.running = False
            if state is JobState.DONE:
                try:
                    self._show_result(job.result, options)
                except (ValueError, RuntimeError, OSError) as exc:
                    log.exception("showing the result failed")
                    self._say(app.readable_error(exc), "error")
            elif state is JobState.CANCELLED:
                self.state.progress_text = ""
                self._say("Cancelled: nothing was added.", "info")
            else:
                log.error("translation failed:\n%s", job.error_details)
                self._say(app.readable_error(job.error), "error")

    def _show_result(self, result: Any, options: app.TranslationOptions) -> None:
        from MedTranslateLib.mrml.layout import result_view_assignments
        from MedTranslateLib.mrml.results import add_result_nodes

        self._clear_nodes(self.result_nodes)
        source = self.case_nodes[0]
        reference = self.case_nodes[1] if len(self.case_nodes) > 1 else None
        model = result.model
        nodes = add_result_nodes(self.slicer.scene, source, result, method=model["method"], model=model["name"],
                                 target=model["target"], reference_node=reference, options=options)
        self.result_nodes = [nodes.synthetic, nodes.difference, nodes.reference_difference, nodes.uncertainty,
                             nodes.metrics_table, nodes.confidence_table]
        self.result = result
        self._assign_views(result_view_assignments(nodes, source, reference))
        self._apply_window(self.state.window_preset)
        self.state.update({"metrics_rows": metrics_rows(result), "confidence_rows": confidence_rows(result),
                           "has_result": True, "result_file": result_file_name(result), "progress": 100,
                           "result_caption": f"{model['name']} ({model['method']}); MAE and RMSE in {self.state.units}, "
                                             f"identity = the source itself"})
        self._say(f"Done in {self.job.elapsed:.1f} s on {result.info.get('device', '?')}.", "success")

    def download(self) -> Any:
        if self.result is None:
            return None
        path = result_nifti(self.result, self.downloads)
        return self.server.protocol.addAttachment(path.read_bytes())

    # -- page ------------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        s, ctrl = self.state, self.ctrl

        @s.change("model")
        def _model_changed(model, **_):
            item = next((m for m in s.models if m["value"] == model), None)
            s.model_caps = item["caps"] if item else ""
            s.stochastic = bool(item and item["stochastic"])
            s.units = item["units"] if item else ""

        @s.change("window_preset")
        def _window_changed(window_preset, **_):
            self._apply_window(window_preset)

        upload = ctrl.trigger_name(self.load_upload)
        download = ctrl.trigger_name(self.download)
        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            client.Style("html { overflow-y: auto; } .mt-table td, .mt-table th { padding: 2px 8px; "
                         "text-align: right; } .mt-table td:first-child { text-align: left; }")
            layout.title.set_text("MedTranslate")
            with layout.toolbar:
                v.VSpacer()
                v.VChip(NOT_FOR_DIAGNOSIS, color="red", variant="flat", id="not-for-diagnosis",
                        prepend_icon="mdi-alert")
            with layout.drawer as drawer:
                drawer.width = 340
                with html.Div(classes="pa-3 d-flex flex-column ga-2"):
                    v.VBtn("Load sample case", id="load-sample", click=self.load_sample, block=True,
                           disabled=("running || busy_loading",), loading=("busy_loading",))
                    v.VFileInput(label="…or upload NIfTI / NRRD / MHA / DICOM zip", id="upload",
                                 density="compact", hide_details=True, disabled=("running || busy_loading",),
                                 change=f"trigger('{upload}', [$event.target.files])")
                    html.Div("{{ case_label }}", id="case-label", classes="text-caption")
                    with html.Div(id="model-box"):
                        v.VSelect(label="Model", items=("models",), v_model=("model",), item_props=True,
                                  density="compact", hide_details=True, disabled=("running",))
                    html.Div("{{ model_caps }}", id="model-caps", classes="text-caption")
                    with html.Div(v_show="stochastic", classes="d-flex ga-2"):
                        v.VTextField(label="Sampling steps", v_model=("steps",), placeholder="default",
                                     density="compact", hide_details=True, id="steps")
                        v.VTextField(label="Samples", v_model=("samples",), density="compact",
                                     hide_details=True, id="samples")
                    v.VTextField(label="Seed (blank: random)", v_model=("seed",), density="compact",
                                 hide_details=True, id="seed")
                    v.VCheckbox(label="Only slices with the ROI (± margin)", v_model=("roi_only",),
                                density="compact", hide_details=True, id="roi-only")
                    with html.Div(id="device-box"):
                        v.VSelect(label="Device", items=("devices",), v_model=("device",), density="compact",
                                  hide_details=True, disabled=("running",))
                    with html.Div(classes="d-flex ga-2"):
                        v.VBtn("Run", id="run", color="primary", click=self.run,
                               disabled=("running || busy_loading || !model",))
                        v.VBtn("Cancel", id="cancel", color="warning", click=self.cancel, v_show="running")
                    v.VProgressLinear(v_model=("progress",), height=6, v_show="running || progress > 0",
                                      id="progress")
                    html.Div("{{ progress_text }}", id="progress-text", classes="text-caption")
                    v.VAlert(text=("message",), type=("message_type",), v_show="message", density="compact",
                             id="message")
                    v.VSelect(label="Window/level", items=("window_presets",), v_model=("window_preset",),
                              density="compact", hide_details=True, clearable=True, id="window")
                    v.VBtn("Download result (NIfTI)", id="download", v_show="has_result", prepend_icon="mdi-download",
                           click=f"utils.download(result_file, trigger('{download}'), 'application/gzip')")
            with layout.content:
                with html.Div(classes="d-flex flex-column", style="height: calc(100vh - 64px);"):
                    html.Div("Top: source | synthetic | reference.  Bottom: difference vs. source | difference vs. "
                             "reference | uncertainty (methods that give one).  Slices are linked.",
                             classes="text-caption px-2", id="legend")
                    with html.Div(style="flex: 1 1 auto; min-height: 0;", id="views"):
                        self.layout_manager.initialize_layout_grid(layout)
                    with html.Div(classes="pa-2", style="flex: 0 0 auto; max-height: 32vh; overflow-y: auto;",
                                  v_show="has_result"):
                        html.Div("{{ result_caption }}", classes="text-caption", id="result-caption")
                        with html.Div(classes="d-flex ga-6"):
                            self._metrics_table()
                            self._confidence_table()

    @staticmethod
    def _metrics_table() -> None:
        with html.Table(classes="mt-table text-body-2", id="metrics"):
            with html.Tr():
                for title in ("region", "MAE", "PSNR (dB)", "SSIM", "RMSE", "identity MAE"):
                    html.Th(title)
            with html.Tr(v_for="row in metrics_rows", key="row.region", classes="metric-row"):
                for key in ("region", "mae", "psnr", "ssim", "rmse", "identity_mae"):
                    html.Td(f"{{{{ row.{key} }}}}", classes=f"m-{key}")

    @staticmethod
    def _confidence_table() -> None:
        with html.Div(v_show="confidence_rows.length", style="max-height: 160px; overflow-y: auto;"):
            with html.Table(classes="mt-table text-body-2", id="confidence"):
                with html.Tr():
                    html.Th("slice")
                    html.Th("confidence")
                with html.Tr(v_for="row in confidence_rows", key="row.slice"):
                    html.Td("{{ row.slice }}")
                    html.Td("{{ row.confidence }}")


def host_warning(host: str) -> str | None:
    """The warning printed when the page is served beyond this computer (None on loopback)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"WARNING: serving on {host}: anyone who can reach this address can use the page, upload to it "
            f"and download its results. There is no authentication.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="medtranslate-web", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this computer only)")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if warning := host_warning(args.host):
        print(warning, file=sys.stderr)
    web = MedTranslateWeb()
    atexit.register(web.close)
    web.server.start(host=args.host, port=args.port, open_browser=False)


if __name__ == "__main__":
    main()
