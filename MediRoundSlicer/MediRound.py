"""MediRound: multi-round, entity-level reasoning segmentation in 3D Slicer.

Module / Widget / Logic / Test as in Slicer's scripted-module template. Everything Slicer-only (the
ScriptedLoadableModule base classes, slicer.app, the volume selector, dialogs) is imported lazily, so the
Logic and the helpers in MediRoundLib import and run outside Slicer with the `slicer-core` package from PyPI.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent):  # MediRoundLib beside us; MediRoundCore beside us (installed) or one up (source)
    if (_p / "MediRoundLib").is_dir() or (_p / "MediRoundCore").is_dir():
        if str(_p) not in sys.path:
            sys.path.insert(0, str(_p))

try:  # inside Slicer
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    IN_SLICER = True
except ImportError:  # outside Slicer: the same names, so the Logic is usable from plain Python
    IN_SLICER = False

    class ScriptedLoadableModule:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest:
        def setUp(self):
            pass

        def delayDisplay(self, message, msec=0):
            print(message)

from MediRoundCore.errors import MediRoundError, SessionError, VolumeError  # noqa: E402
from MediRoundCore.imaging import extract_slice  # noqa: E402
from MediRoundCore.session import Session  # noqa: E402
from MediRoundLib import geometry, segments  # noqa: E402
from MediRoundLib.worker import InferenceWorker  # noqa: E402

MODULE_DIR = _HERE
FINGERPRINT_ATTRIBUTE = "MediRound.VolumeFingerprint"


#
# MediRound
#
class MediRound(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "MediRound"
        parent.categories = ["Segmentation"]
        parent.dependencies = []
        parent.contributors = ["MediRound contributors"]
        parent.helpText = (
            "Segment anatomy by conversation: ask about the slice shown in the Red view ('Segment the liver', "
            "'now the lesion inside it'); every answer becomes a segment 'R<n>: <entity>'. Later rounds may refer "
            "to earlier ones. Undo, new session and saving to .seg.nrrd are in the panel. "
            "See <a href='https://github.com/mediround/MediRound/blob/main/docs/slicer.md'>the user guide</a>.")
        parent.acknowledgementText = (
            "MediRound follows 'MediRound: Multi-Round Entity-Level Reasoning Segmentation in Medical Images'; "
            "it builds on LLaVA-Med and MedSAM.")


#
# MediRoundWidget
#
class MediRoundWidget(ScriptedLoadableModuleWidget):
    """The panel: the chat part (MediRoundLib.panel.ChatPanel, standard Qt widgets from Resources/UI) plus the
    Slicer-only volume selector, dialogs and the dependency installer."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.chat = None
        self._observers = []

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        import slicer

        from MediRoundLib.panel import ChatPanel

        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MediRound.ui"))
        self.layout.addWidget(ui_widget)
        self.logic = MediRoundLogic()
        self.chat = ChatPanel(ui_widget, self.logic, dialogs=SlicerDialogs(), before_ask=self.ensureDependencies,
                              can_prepare=self.dependenciesReady)
        self.chat.notice = dependency_notice(self.logic.checkpoint)
        self.chat.refresh()

        self.volumeSelector = slicer.qMRMLNodeComboBox()
        self.volumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volumeSelector.selectNodeUponCreation = True
        self.volumeSelector.addEnabled = False
        self.volumeSelector.removeEnabled = False
        self.volumeSelector.noneEnabled = True
        self.volumeSelector.showHidden = False
        self.volumeSelector.setMRMLScene(slicer.mrmlScene)
        self.volumeSelector.setToolTip("The volume to talk about; Ask reads the slice shown in the Red view.")
        self.chat.ui.volumeSelectorLayout.addWidget(self.volumeSelector)
        self.volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self._observers.append(slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndCloseEvent, self.onSceneClosed))
        self.layout.addStretch(1)
        # Select the volume shown in the Red view, if any.
        layout = slicer.app.layoutManager()
        if layout is not None:
            red = layout.sliceWidget("Red").sliceLogic().GetBackgroundLayer().GetVolumeNode()
            if red is not None:
                self.volumeSelector.setCurrentNode(red)

    def cleanup(self):
        import slicer

        for tag in self._observers:
            slicer.mrmlScene.RemoveObserver(tag)
        if self.chat is not None:
            self.chat.shutdown()
        if self.logic is not None:
            self.logic.shutdown()

    def onSceneClosed(self, caller=None, event=None):
        if self.chat is not None:
            self.chat.set_volume(None)

    def onVolumeChanged(self, node):
        self.chat.set_volume(node)

    def dependenciesReady(self) -> bool:
        """Whether the model can load without asking the user anything: encoding ahead (while the user types or
        scrolls) never offers an install; the Ask does."""
        from MediRoundLib.dependencies import install_plan, python_problem

        return bool(self.logic.server_url) or (not python_problem()
                                                and not install_plan(checkpoint=self.logic.checkpoint).needed)

    def ensureDependencies(self) -> bool:
        """On first use: offer to install what the model needs (main thread, modal); False when not ready.
        After an install the packages import in this session: no restart."""
        import slicer

        from MediRoundLib.dependencies import install, install_plan, python_problem

        if self.logic.server_url:  # the model runs on the server: nothing to install here
            return True
        problem = python_problem()
        if problem:
            slicer.util.errorDisplay(problem, windowTitle="MediRound")
            return False
        try:
            import PyTorchUtils  # the PyTorch extension (fepegar/SlicerPyTorch)
            torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        except ImportError:
            torch_logic = None
        plan = install_plan(torch_extension_available=torch_logic is not None, checkpoint=self.logic.checkpoint)
        if not plan.needed:
            return True
        if plan.torch_extension_missing:
            slicer.util.errorDisplay("MediRound needs PyTorch. Install the 'PyTorch' extension from the Extensions "
                                     "Manager, restart Slicer and press Ask again.", windowTitle="MediRound")
            return False
        if not slicer.util.confirmOkCancelDisplay(
                f"MediRound needs {plan.describe()}. Install now? This downloads several hundred MB and may take "
                "a few minutes.", "MediRound: install dependencies"):
            return False
        try:
            with slicer.util.tryWithErrorDisplay("MediRound: installing dependencies failed. Press Ask to retry.",
                                                 waitCursor=True):
                install(plan, torch_logic, slicer.util.pip_install)
        except Exception:  # tryWithErrorDisplay has shown it, then re-raised it
            return False
        return not install_plan(checkpoint=self.logic.checkpoint).needed


def dependency_notice(checkpoint=None) -> str:
    """What the panel says before the first Ask when the model in `checkpoint` (None: the bundled default) cannot
    run yet (never imports torch)."""
    import slicer

    from MediRoundLib.dependencies import install_plan, python_problem, slicer_version_warning

    problem = python_problem()
    if problem:
        return problem
    notes = [slicer_version_warning(getattr(slicer.app, "majorVersion", None),
                                    getattr(slicer.app, "minorVersion", None))]
    plan = install_plan(checkpoint=checkpoint)
    if plan.needed:
        notes.append(f"The model needs {plan.describe()}: press Ask to install (once; no restart needed).")
    return " ".join(n for n in notes if n)


class SlicerDialogs:
    """The panel's dialogs, through Slicer's helpers (the PySide6 tests use plain Qt ones)."""

    def question(self, title, text) -> bool:
        import slicer
        return slicer.util.confirmYesNoDisplay(text, title)

    def error(self, title, text):
        import slicer
        slicer.util.errorDisplay(text, windowTitle=title)

    def save_path(self, title, suggestion) -> str:
        import qt
        return qt.QFileDialog.getSaveFileName(None, title, suggestion, "Segmentation (*.seg.nrrd)")

    def folder(self, title) -> str:
        import qt
        return qt.QFileDialog.getExistingDirectory(None, title)


#
# MediRoundLogic
#
@dataclass
class LogicEvent:
    kind: str  # "progress" | "round" | "engine" | "prepared" | "error"
    message: str = ""
    fraction: float = 0.0
    round: object = None  # session.Round for "round"
    error: Exception | None = None  # for "error"; for "prepared", why encoding ahead failed (never shown)
    timings: dict | None = None  # "prepared": what it did (empty: the slice was ready; None: it was skipped)


def default_sessions_dir() -> Path:
    """Where autosaved sessions live: MEDIROUND_SESSIONS_DIR, else beside Slicer's settings, else ~/.cache."""
    env = os.environ.get("MEDIROUND_SESSIONS_DIR")
    if env:
        return Path(env)
    try:
        import slicer
        settings_file = slicer.app.slicerUserSettingsFilePath
        return Path(settings_file).parent / "MediRound" / "sessions"
    except (ImportError, AttributeError):
        return Path.home() / ".cache" / "mediround" / "sessions"


class MediRoundLogic(ScriptedLoadableModuleLogic):
    """Sessions, slices, segments, autosave and the inference worker. No Qt: usable from the Python console,
    scripts and tests (`scene` defaults to slicer.mrmlScene)."""

    def __init__(self, scene=None, sessions_dir: str | Path | None = None, engine_factory=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.sessions_dir = Path(sessions_dir) if sessions_dir is not None else default_sessions_dir()
        self.engine_factory = engine_factory  # callable(checkpoint | None) -> Engine; default Engine.load
        self.checkpoint: str | None = None  # None: the bundled default model
        self.server_url: str | None = None  # a `mediround serve` URL instead of a local model (docs/server.md)
        self.server_token: str | None = None
        self.engine = None
        self.view_name = "Red"
        self.volume_node = None
        self.volume = None  # MediRoundCore Volume of volume_node (local RAS)
        self.ijk_to_ras = None
        self.session: Session | None = None
        self.segmentation_node = None
        self._worker: InferenceWorker | None = None
        self._jobs: dict[int, dict] = {}
        # Encoding ahead: the key of the slice the latest prepare was queued for (a queued prepare whose key is no
        # longer this one is skipped when its turn comes), and what was prepared last (key, rounds kept alive).
        self._prepare_target = None
        self._prepared = None

    # -- basics -------------------------------------------------------------------------------------------------
    @property
    def scene(self):
        if self._scene is None:
            import slicer
            return slicer.mrmlScene
        return self._scene

    @property
    def worker(self) -> InferenceWorker:
        if self._worker is None:
            self._worker = InferenceWorker()
        return self._worker

    @property
    def busy(self) -> bool:
        """An Ask is queued or running (with the model load before it). Encoding ahead does not count: an Ask
        queues behind it, and nothing else waits for it."""
        return any(info["kind"] == "ask" for info in self._jobs.values())

    @property
    def pending(self) -> bool:
        """Any job is queued or running, encoding ahead included (the panel polls until none is)."""
        return bool(self._jobs)

    def shutdown(self):
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    @property
    def device_description(self) -> str:
        if self.engine is not None:
            return self.engine.device_description
        if self.server_url:
            return f"server {self.server_url}: connects on the next Ask"
        return "model not loaded yet (GPU when there is one, else CPU)"

    def set_checkpoint(self, checkpoint: str | None):
        """Use the bundled default model (None) or our checkpoint folder; loaded on the next Ask."""
        if self.busy:
            raise MediRoundError("wait for the running Ask to finish before changing the model")
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.engine = None

    def set_server(self, url: str | None, token: str | None = None):
        """Ask a `mediround serve` server (None: the local model, as before); connects on the next Ask. The
        session stays local too: every round is autosaved here as well."""
        if self.busy:
            raise MediRoundError("wait for the running Ask to finish before changing the server")
        url, token = (url or "").strip() or None, (token or "").strip() or None
        if url:
            from MediRoundCore.remote.client import ServerClient

            ServerClient(url, token=token)  # checks the address (and a token over plain http) without connecting
        self.server_url, self.server_token = url, token
        self.engine = None

    # -- volumes and sessions -------------------------------------------------------------------------------
    def session_folder(self, fingerprint: str) -> Path:
        return self.sessions_dir / fingerprint

    def _core_volume(self, volume_node):
        volume = geometry.volume_from_node(volume_node)
        return volume, geometry.ijk_to_ras_matrix(volume_node)

    def find_saved_session(self, volume_node) -> Path | None:
        """The autosaved session folder of this volume (same voxels and geometry), when it holds rounds."""
        if volume_node is None or volume_node.GetImageData() is None:
            return None
        volume = geometry.volume_from_node(volume_node)
        folder = self.session_folder(volume.fingerprint())
        try:
            saved = Session.load(folder, volume.fingerprint())
        except SessionError:
            return None
        return folder if saved.rounds else None

    def set_volume(self, volume_node, restore: bool = False) -> Session | None:
        """Start (or, with `restore`, resume the autosaved) session of `volume_node`; None clears."""
        if self.busy:
            raise MediRoundError("wait for the running Ask to finish before changing the volume")
        if volume_node is None:
            self.volume_node = self.session = self.segmentation_node = None
            self.volume = self.ijk_to_ras = None
            return None
        # Validate the new volume (and its saved session) first: a refused volume keeps the current session.
        volume, ijk_to_ras = self._core_volume(volume_node)
        fingerprint = volume.fingerprint()
        folder = self.session_folder(fingerprint)
        restored = Session.load(folder, fingerprint) if restore else None
        self.volume_node, self.volume, self.ijk_to_ras = volume_node, volume, ijk_to_ras
        self.segmentation_node = None
        if restored is not None:
            self.session = restored
        else:
            self._archive(folder)
            self.session = Session(fingerprint, folder, volume_node.GetName())
        self.session.volume = self.volume
        self.segmentation_node = self._segmentation_node_for(volume_node, fingerprint, reuse=restore)
        for r in self.session.rounds:
            if r.absent:  # answered "not on this slice": no segment
                continue
            image = extract_slice(self.volume, r.view, r.slice_index)
            segments.add_round_segment(self.segmentation_node, self.volume, self.ijk_to_ras, image, r.mask,
                                       r.number, r.entity)
        return self.session

    def new_session(self) -> Session:
        """Keep the current segments in the scene (their node is renamed), start an empty session."""
        if self.volume_node is None:
            raise VolumeError("select a volume first")
        if self.session is not None and self.session.folder is not None:
            self._archive(self.session.folder)  # first: a session in use elsewhere leaves everything as it was
        if self.segmentation_node is not None:
            self.segmentation_node.RemoveAttribute(FINGERPRINT_ATTRIBUTE)
            self.segmentation_node.SetName(self.segmentation_node.GetName() + " (earlier session)")
        return self.set_volume(self.volume_node, restore=False)

    def _archive(self, folder: Path):
        """A fresh session never overwrites a saved one: the old folder is renamed aside, under the session's lock
        (a program writing it now makes this a "session in use by …" error)."""
        if (folder / "session.json").is_file():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = folder.with_name(f"{folder.name}-{stamp}")
            n = 1
            while target.exists():
                target = folder.with_name(f"{folder.name}-{stamp}-{n}")
                n += 1
            from MediRoundCore.session_lock import hold

            with hold(folder, wait=0, command="3D Slicer: New session"):  # never under another program's writer
                folder.rename(target)

    def _segmentation_node_for(self, volume_node, fingerprint, reuse):
        if reuse:
            nodes = self.scene.GetNodesByClass("vtkMRMLSegmentationNode")
            for i in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(i)
                if node.GetAttribute(FINGERPRINT_ATTRIBUTE) == fingerprint:
                    for seg_id in segments.segment_ids(node):
                        if seg_id.startswith(segments.SEGMENT_ID_PREFIX):
                            node.GetSegmentation().RemoveSegment(seg_id)
                    return node
        node = segments.create_segmentation_node(self.scene, volume_node, f"MediRound: {volume_node.GetName()}")
        node.SetAttribute(FINGERPRINT_ATTRIBUTE, fingerprint)
        return node

    # -- asking -----------------------------------------------------------------------------------------------
    def current_plane(self, view_name: str | None = None) -> geometry.VoxelPlane:
        if self.volume_node is None:
            raise VolumeError("select a volume first")
        view_name = view_name or self.view_name
        slice_node = geometry.find_slice_node(self.scene, view_name)
        if slice_node is None:
            raise VolumeError(f"there is no '{view_name}' slice view")
        return geometry.voxel_plane_for_view(self.volume_node, slice_node, self.volume)

    def _engine_settings(self) -> tuple:
        return (self.checkpoint, self.server_url, self.server_token, self.engine_factory)

    def _queue_load(self) -> None:
        """Queue loading the model unless it is loaded or a load of the same model is queued already (by an
        Ask or by encoding ahead): one load job only."""
        if self.engine is not None:
            return
        settings = self._engine_settings()
        if any(info["kind"] == "load" and info["settings"] == settings for info in self._jobs.values()):
            return
        job = self.worker.submit(self._load_engine, self.checkpoint, settings, name="load")
        self._jobs[job] = {"kind": "load", "settings": settings}

    def _load_engine(self, checkpoint, settings=None):
        """Worker thread. The engine is kept only when the model asked for is still the chosen one (the user may
        change it while a load started ahead runs)."""
        factory = self.engine_factory
        if self.server_url:
            from MediRoundCore.remote.client import RemoteEngine

            url, token = self.server_url, self.server_token
            factory = lambda checkpoint: RemoteEngine.connect(url, token=token)  # noqa: E731
        elif factory is None:
            from MediRoundCore.engine import Engine
            factory = Engine.load
        engine = factory(checkpoint)
        if settings is None or settings == self._engine_settings():
            self.engine = engine
        return engine.device_description

    def _prepare_key(self, plane) -> tuple:
        """What a prepare is for: the session, the voxel plane, the session's rounds (the objects) and the model."""
        return (id(self.session), plane.view, plane.index, tuple(map(id, self.session.rounds)),
                self._engine_settings())

    def submit_prepare(self, view_name: str | None = None) -> int | None:
        """Encode ahead the slice shown in the view (main thread): queue loading the model if needed, then the
        encoding of the slice and the dialogue so far (Engine.prepare), so that the next Ask on it starts at its
        query. Returns the job, or None when there is nothing to do: no volume, an Ask queued, the view outside
        the volume, or this slice was prepared last with the same rounds and model. Its end comes from `poll()`
        as a quiet "prepared" event; a failure is never shown as an error (an Ask reports its own)."""
        if self.session is None or self.volume is None or self.busy:
            return None
        try:
            plane = self.current_plane(view_name)
            key = self._prepare_key(plane)
            if self._prepared is not None and self._prepared[0] == key:
                return None
            image = extract_slice(self.volume, plane.view, plane.index)
        except MediRoundError:
            return None
        self._queue_load()
        session = self.session
        self._prepare_target = key
        job = self.worker.submit(self._run_prepare, key, session, image, name="prepare")
        self._jobs[job] = {"kind": "prepare", "key": key, "plane": (plane.view, plane.index)}
        self._prepared = (key, session, list(session.rounds))  # kept alive: the ids in the key stay theirs
        return job

    def _run_prepare(self, key, session, image):
        """Worker thread: the engine's prepare, unless a later prepare or an Ask elsewhere has superseded it."""
        if self._prepare_target is not key:
            return None
        engine = self.engine
        if engine is None:
            raise MediRoundError("the model is not loaded")
        prepare = getattr(engine, "prepare", None)
        return prepare(session, image) if prepare is not None else None

    def submit_ask(self, query: str, reference: int | None = None, use_jcm: bool = True, beta: float | None = None,
                   view_name: str | None = None) -> int:
        """Queue one round on the slice shown in the view (main thread); results come from `poll()`."""
        if self.session is None:
            raise VolumeError("select a volume first")
        if self.busy:
            raise MediRoundError("an Ask is already running")
        plane = self.current_plane(view_name)
        image = extract_slice(self.volume, plane.view, plane.index)
        if self._prepare_target is not None and self._prepare_target != self._prepare_key(plane):
            self._prepare_target = None  # a prepare of another slice still queued is skipped; the Ask goes first
        self._queue_load()
        session, engine_holder = self.session, self
        job = self.worker.submit(lambda progress: engine_holder.engine.ask(
            session, query, image, reference=reference, use_jcm=use_jcm, beta=beta, progress=progress),
            name="ask", with_progress=True)
        self._jobs[job] = {"kind": "ask", "image": image, "session": session,
                           "segmentation": self.segmentation_node, "volume": self.volume,
                           "ijk_to_ras": self.ijk_to_ras}
        return job

    def poll(self, wait: float = 0.0) -> list[LogicEvent]:
        """Main thread: apply finished jobs (segments are written here, never on the worker). With `wait`, first
        hand the GIL to the worker for up to `wait` seconds while none has finished (see InferenceWorker.poll)."""
        if self._worker is None:
            return []
        out = []
        for event in self._worker.poll(wait if self._jobs else 0.0):
            job = self._jobs.get(event.job_id, {})
            kind = job.get("kind")
            if event.kind == "progress":
                message, fraction = event.payload
                out.append(LogicEvent("progress", message, fraction))
                continue
            self._jobs.pop(event.job_id, None)
            if event.kind == "error":
                if kind in ("load", "prepare"):
                    self._prepared = None  # prepare again when asked to
                if kind == "load":  # the ask queued behind it fails too; drop it quietly
                    asks = [info for info in self._jobs.values() if info.get("kind") == "ask"]
                    for info in asks:
                        info["skip_error"] = True
                    if not asks:  # loaded ahead for a prepare only: quiet; the next Ask loads and reports
                        out.append(LogicEvent("prepared", _describe(event.payload), error=event.payload))
                        continue
                if kind == "prepare":
                    out.append(LogicEvent("prepared", _describe(event.payload), error=event.payload))
                    continue
                if job.get("skip_error"):
                    continue
                out.append(LogicEvent("error", _describe(event.payload), error=event.payload))
            elif kind == "load":
                out.append(LogicEvent("engine", str(event.payload)))
            elif kind == "ask":
                out.append(self._apply_round(job, event.payload))
            elif kind == "prepare":
                view, index = job["plane"]
                out.append(LogicEvent("prepared", f"{view} slice {index}", 1.0, timings=event.payload))
        return out

    def _apply_round(self, job, result) -> LogicEvent:
        round_ = result.round
        if job["session"] is not self.session:  # the volume or session changed meanwhile: keep the round there
            return LogicEvent("error", "the session changed while the model was answering; the answer was kept "
                                       "in the earlier session only")
        if round_.absent:  # the model says the structure is not on this slice: a round, but no segment
            return LogicEvent("round", f"round {round_.number} done", 1.0, round=round_)
        try:
            segments.add_round_segment(job["segmentation"], job["volume"], job["ijk_to_ras"], job["image"],
                                       round_.mask, round_.number, round_.entity)
        except Exception as exc:
            self.session.undo()  # keep session and segmentation in step
            return LogicEvent("error", f"could not write the segment: {exc}", error=exc)
        return LogicEvent("round", f"round {round_.number} done", 1.0, round=round_)

    def ask(self, query: str, reference: int | None = None, use_jcm: bool = True, beta: float | None = None,
            view_name: str | None = None, timeout: float | None = 600):
        """Synchronous Ask (console, scripts, tests): returns the new session round."""
        self.submit_ask(query, reference, use_jcm, beta, view_name)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.poll():
                if event.kind == "error":
                    raise event.error if isinstance(event.error, Exception) else MediRoundError(event.message)
                if event.kind == "round":
                    return event.round
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the model did not answer in time")
            time.sleep(0.01)

    # -- undo and save ----------------------------------------------------------------------------------------
    def undo(self):
        """Undo the last round: its segment leaves the segmentation and the round the (autosaved) session."""
        if self.session is None or not self.session.rounds:
            raise SessionError("nothing to undo: the session has no rounds")
        if self.busy:
            raise MediRoundError("wait for the running Ask to finish before undoing")
        last = self.session.undo()
        segments.remove_round_segment(self.segmentation_node, last.number)
        return last

    def save_segments(self, path: str | Path) -> tuple[Path, Path]:
        """Write `<name>.seg.nrrd` and the session folder `<name>.mediround/` beside it."""
        if self.session is None or self.segmentation_node is None:
            raise SessionError("there is no session to save")
        path = Path(path)
        name = path.name
        if name.lower().endswith(".seg.nrrd"):
            stem = name[: -len(".seg.nrrd")]
        else:
            stem = name[: -len(path.suffix)] if path.suffix else name
            path = path.with_name(stem + ".seg.nrrd")
        path.parent.mkdir(parents=True, exist_ok=True)
        segments.save_seg_nrrd(self.segmentation_node, path)
        folder = path.with_name(stem + ".mediround")
        copy = Session(self.session.volume_fingerprint, None, self.session.volume_name)
        copy.rounds = list(self.session.rounds)
        if folder.exists():
            shutil.rmtree(folder)
        copy.save(folder)
        return path, folder


def _describe(exc) -> str:
    if isinstance(exc, MediRoundError):
        return str(exc)
    if isinstance(exc, ImportError):
        return f"a package is missing: {exc}. Press Ask to install it."
    return f"{type(exc).__name__}: {exc}"


#
# MediRoundTest
#
class MediRoundTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or `slicer_add_python_unittest`): a synthetic volume, the Red view on a
    marked slice, a random tiny model (or, where torch is not installed yet, as in a Slicer build tree, the
    threshold stand-in of MediRoundLib.testing), two rounds, undo, save and read back."""

    def setUp(self):
        import slicer
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_rounds_segments_undo_save()

    @staticmethod
    def engine_factory():
        from MediRoundLib.dependencies import installed

        if not installed("torch"):
            from MediRoundLib.testing import ThresholdEngine
            return "threshold stand-in (torch is not installed)", lambda checkpoint: ThresholdEngine(0)
        from MediRoundCore.engine import Engine
        return "random tiny model", lambda checkpoint: Engine.random_tiny(seed=0)

    def test_rounds_segments_undo_save(self):
        import tempfile

        import numpy as np
        import slicer

        from MediRoundLib.testing import show_plane

        self.delayDisplay("Synthetic volume")
        array = np.full((20, 64, 64), -800, np.int16)
        array[:, 16:48, 12:40] = 60
        ijk_to_ras = np.diag([0.8, 0.8, 2.5, 1.0])
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras, name="mediround-test")
        if slicer.app.layoutManager() is not None:
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
        red = geometry.find_slice_node(slicer.mrmlScene, "Red")
        show_plane(red, "axial", (ijk_to_ras @ np.array([32, 32, 7, 1.0]))[:3])
        name, factory = self.engine_factory()
        self.delayDisplay(f"Engine: {name}")
        with tempfile.TemporaryDirectory() as tmp:
            logic = MediRoundLogic(sessions_dir=tmp, engine_factory=factory)
            logic.set_volume(volume)
            self.assertEqual(logic.current_plane().index, 7)
            self.delayDisplay("Round 1")
            r1 = logic.ask("Segment the liver.")
            self.assertEqual((r1.view, r1.slice_index), ("axial", 7))
            r2 = logic.ask("Now the lesion inside it.")
            self.assertEqual(r2.reference, 1)
            ids = segments.segment_ids(logic.segmentation_node)
            self.assertEqual(ids, ["MediRound_R1", "MediRound_R2"])
            for seg_id in ids:
                voxels = segments.segment_array(logic.segmentation_node, seg_id, logic.volume, logic.ijk_to_ras)
                self.assertEqual(voxels.sum(), voxels[7].sum())  # only slice k=7
            self.delayDisplay("Undo")
            logic.undo()
            self.assertEqual(segments.segment_ids(logic.segmentation_node), ["MediRound_R1"])
            self.assertEqual(len(Session.load(logic.session.folder).rounds), 1)
            self.delayDisplay("Save")
            seg_path, folder = logic.save_segments(Path(tmp) / "out.seg.nrrd")
            loaded = slicer.vtkMRMLSegmentationNode()
            slicer.mrmlScene.AddNode(loaded)
            storage = slicer.vtkMRMLSegmentationStorageNode()
            slicer.mrmlScene.AddNode(storage)
            storage.SetFileName(str(seg_path))
            self.assertTrue(storage.ReadData(loaded))
            self.assertEqual(loaded.GetSegmentation().GetNumberOfSegments(), 1)
            self.assertEqual(len(Session.load(folder).rounds), 1)
            self.assertEqual(logic.find_saved_session(volume), logic.session.folder)
            logic.shutdown()
        self.delayDisplay("Test passed")
