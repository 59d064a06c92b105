"""The chat part of the panel, on standard Qt widgets loaded from Resources/UI/MediRound.ui.

Runs under Slicer's PythonQt and under PySide6 (tests, screenshots) through the `qt` alias. It talks to a
MediRoundLogic: Ask submits a job to the logic's worker thread, a QTimer polls the logic on the main thread
(which writes the segment) and the history is redrawn; the panel never blocks.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import re

from MediRoundLib import qt, segments

WIDGETS = ("historyBrowser", "queryEdit", "askButton", "referenceCombo", "jcmCheckBox", "betaSpinBox",
           "progressBar", "statusLabel", "undoButton", "newSessionButton", "saveButton", "modelCombo",
           "checkpointEdit", "browseButton", "deviceLabel", "sliceLabel", "volumeSelectorLayout", "serverEdit",
           "tokenEdit")
# While an Ask runs, the poll timer fires every POLL_MS and each call hands the GIL to the inference thread for
# up to YIELD_MS (it returns as soon as the thread reports). Slicer's main thread holds the GIL while Qt idles,
# so this share is all the thread gets; the rest of each period keeps the user interface responsive.
# Chosen by measurement in the PythonQt host (docs/design-notes.md, "Inference under Slicer's GIL").
POLL_MS = int(os.environ.get("MEDIROUND_POLL_MS", "20"))
YIELD_MS = int(os.environ.get("MEDIROUND_YIELD_MS", "15"))
# Encoding ahead: when the shown slice changes or the user edits the query, the slice is encoded (and the model
# loaded) in the background once nothing has changed for AHEAD_MS, so the Ask that follows starts at its query.
AHEAD_MS = int(os.environ.get("MEDIROUND_AHEAD_MS", "300"))
DEFAULT_SLICE_TEXT = "Ask reads the slice shown in the Red view."


class _Ui:
    """The named widgets and layouts of the .ui file, as attributes (looked up by name: under PythonQt
    `objectName` is a property, not a getter)."""

    def __init__(self, root):
        found = {name: root.findChild(qt.QObject, name) for name in WIDGETS}
        missing = [n for n, child in found.items() if child is None]
        if missing:
            raise RuntimeError(f"MediRound.ui lacks {', '.join(missing)}")
        self.__dict__.update(found)


class QtDialogs:
    """Plain Qt dialogs (the Slicer module passes its own)."""

    def question(self, title, text) -> bool:
        box = qt.QMessageBox
        return box.question(None, title, text, box.Yes | box.No) == box.Yes

    def error(self, title, text):
        qt.QMessageBox.critical(None, title, text)

    def save_path(self, title, suggestion) -> str:
        result = qt.QFileDialog.getSaveFileName(None, title, suggestion, "Segmentation (*.seg.nrrd)")
        return result[0] if isinstance(result, tuple) else result

    def folder(self, title) -> str:
        return qt.QFileDialog.getExistingDirectory(None, title)


class ChatPanel:
    def __init__(self, root, logic, dialogs=None, before_ask=None, can_prepare=None):
        self.root = root
        self.ui = _Ui(root)
        self.logic = logic
        self.dialogs = dialogs or QtDialogs()
        self.before_ask = before_ask  # callable() -> bool (dependency check inside Slicer)
        self.can_prepare = can_prepare  # callable() -> bool: whether encoding ahead may load the model now
        self.encode_ahead = True
        self.status = ""
        self.notice = ""  # shown while there is no status (e.g. "press Ask to install PyTorch")
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self.ahead_timer = qt.QTimer()
        self.ahead_timer.setSingleShot(True)
        self.ahead_timer.setInterval(AHEAD_MS)
        self.ahead_timer.timeout.connect(self.prepare_ahead)
        self._watched = None  # (slice node, observer tag) of the view Ask reads
        ui = self.ui
        ui.queryEdit.textEdited.connect(self.schedule_prepare)
        ui.askButton.clicked.connect(self.on_ask)
        ui.queryEdit.returnPressed.connect(self.on_ask)
        ui.undoButton.clicked.connect(self.on_undo)
        ui.newSessionButton.clicked.connect(self.on_new_session)
        ui.saveButton.clicked.connect(self.on_save)
        ui.jcmCheckBox.toggled.connect(lambda on: ui.betaSpinBox.setEnabled(bool(on)))
        ui.modelCombo.currentIndexChanged.connect(self.on_model_changed)
        ui.browseButton.clicked.connect(self.on_browse)
        ui.serverEdit.editingFinished.connect(self.on_server_changed)
        ui.tokenEdit.editingFinished.connect(self.on_server_changed)
        ui.historyBrowser.setOpenLinks(False)
        from MediRoundCore.checkpoint_info import default_model_name  # no torch import

        ui.modelCombo.setItemText(0, f"Bundled {default_model_name()}")
        self.adopt_model_beta()
        self.refresh()

    def adopt_model_beta(self):
        """Show the β the chosen model was shipped with (it was chosen on validation data); a model whose JCM is
        untrained (a stage-1 checkpoint: it is not applied) gets its JCM switch off and disabled, saying why."""
        from MediRoundCore.checkpoint_info import checkpoint_beta, checkpoint_jcm_trained  # no torch import

        self.ui.betaSpinBox.setValue(checkpoint_beta(self.logic.checkpoint))
        trained = checkpoint_jcm_trained(self.logic.checkpoint)
        box = self.ui.jcmCheckBox
        was_enabled = bool(_call(box.enabled)) if hasattr(box, "enabled") else bool(box.isEnabled())
        if trained != was_enabled:  # off for an untrained JCM; on again (the default) for a trained one
            box.setChecked(trained)
        box.setEnabled(trained)
        self.ui.jcmCheckBox.setToolTip("" if trained else "This model's JCM is untrained (a stage-1 checkpoint): "
                                       "its masks are not judged or corrected.")

    # -- state → widgets ----------------------------------------------------------------------------------
    def refresh(self):
        ui, logic = self.ui, self.logic
        has_session = logic.session is not None
        rounds = logic.session.rounds if has_session else []
        busy = logic.busy
        ui.askButton.setEnabled(has_session and not busy)
        ui.queryEdit.setEnabled(has_session)
        ui.undoButton.setEnabled(bool(rounds) and not busy)
        ui.newSessionButton.setEnabled(has_session and not busy)
        ui.saveButton.setEnabled(bool(rounds) and not busy)
        ui.modelCombo.setEnabled(not busy and not logic.server_url)
        ui.serverEdit.setEnabled(not busy)
        ui.tokenEdit.setEnabled(not busy)
        ui.browseButton.setEnabled(not busy and _current_index(ui.modelCombo) == 1)
        ui.deviceLabel.setText(logic.device_description)
        # reference chooser: Auto + every earlier round, keeping the choice when it still exists
        combo = ui.referenceCombo
        keep = _current_index(combo)
        combo.blockSignals(True)
        while _count(combo) > 1:
            combo.removeItem(_count(combo) - 1)
        for r in rounds:
            combo.addItem(f"R{r.number}: {r.entity or 'unnamed'}")
        combo.setCurrentIndex(keep if keep < _count(combo) else 0)
        combo.blockSignals(False)
        ui.historyBrowser.setHtml(self.history_html())
        bar = ui.historyBrowser.verticalScrollBar()
        bar.setValue(_call(bar.maximum))
        if not busy:
            ui.progressBar.setValue(0)
        ui.statusLabel.setText(self.status or self.notice or ("Select a volume to start." if not has_session else
                                               f"{len(rounds)} round(s). Ask about the slice in the Red view."))

    def history_html(self) -> str:
        logic = self.logic
        if logic.session is None:
            return "<p style='color:#888'>No volume selected.</p>"
        if not logic.session.rounds:
            return ("<p style='color:#888'>New conversation on <b>%s</b>. Type what to segment, e.g. "
                    "<i>Segment the liver.</i>, then <i>Now the lesion inside it.</i></p>"
                    % html.escape(logic.session.volume_name or "the volume"))
        parts = []
        for r in logic.session.rounds:
            color = _segment_color(logic, r.number)
            swatch = (f"<span style='background-color:{color}; color:{color}'>&nbsp;&nbsp;&nbsp;</span>&nbsp;"
                      if color else "")
            meta = [f"{r.view} slice {r.slice_index}"]
            if getattr(r, "absent", False):
                meta.append("no segment: not on this slice")
            if r.reference is not None:
                meta.append(f"refers to R{r.reference}" + (" (a guess)" if getattr(r, "reference_guessed", False)
                                                           else ""))
            alternatives = getattr(r, "reference_alternatives", None)
            if alternatives:  # the how-to only under the last round: Undo removes the last round alone
                from MediRoundCore.references import alternatives_note  # numpy only

                meta.append(html.escape(alternatives_note(alternatives, logic.session.entities))
                            + (": to use one, Undo, pick it under Refers to and Ask again"
                               if r is logic.session.rounds[-1] else ""))
            if r.jcm_score is not None:
                meta.append(f"JCM {r.jcm_score:.2f}" + (" &#9998; corrected" if r.corrected else ""))
            parts.append(
                "<table width='100%' cellspacing='0' cellpadding='4' style='margin-bottom:6px'>"
                f"<tr><td><b>R{r.number}</b> &nbsp;<span style='color:#2a62bc'><b>You:</b></span> "
                f"{html.escape(r.query)}</td></tr>"
                f"<tr><td style='background-color:#eef3ea'>{swatch}<b>MediRound:</b> "
                f"{html.escape(_display_answer(r.answer)) or '<i>(no text)</i>'}</td></tr>"
                f"<tr><td style='color:#777; font-size:small'>{' · '.join(meta)}</td></tr></table>")
        return "".join(parts)

    # -- actions ------------------------------------------------------------------------------------------
    def set_volume(self, volume_node):
        logic = self.logic
        self.status = ""
        try:
            restore = False
            if volume_node is not None:
                folder = logic.find_saved_session(volume_node)
                if folder is not None:
                    restore = self.dialogs.question(
                        "MediRound", f"A saved MediRound session exists for {volume_node.GetName()} ({folder}). "
                                     "Continue it? (No starts a new one; the saved one is kept aside.)")
            logic.set_volume(volume_node, restore=restore)
            if restore:
                self.status = f"Restored {len(logic.session.rounds)} round(s)."
        except Exception as exc:
            self.status = f"Error: {exc}"
        self.watch_view()
        self.refresh()

    # -- encoding ahead -----------------------------------------------------------------------------------------
    def watch_view(self):
        """Observe the slice node of the view Ask reads: a change of the shown slice schedules encoding ahead."""
        self.unwatch_view()
        logic = self.logic
        if logic.session is None:
            return
        from MediRoundLib import geometry

        try:
            node = geometry.find_slice_node(logic.scene, logic.view_name)
        except Exception:  # no scene (e.g. being closed): nothing to watch
            node = None
        if node is not None:
            import vtk

            self._watched = (node, node.AddObserver(vtk.vtkCommand.ModifiedEvent, self.on_view_modified))

    def unwatch_view(self):
        if self._watched is not None:
            node, tag = self._watched
            node.RemoveObserver(tag)
            self._watched = None

    def on_view_modified(self, caller=None, event=None):
        self.schedule_prepare()

    def schedule_prepare(self, *args):
        """(Re)start the debounce: the slice is encoded ahead once the user pauses for AHEAD_MS."""
        if self.encode_ahead and self.logic.session is not None and not self.logic.busy:
            self.ahead_timer.start()

    def prepare_ahead(self):
        """Queue encoding ahead of the shown slice (quietly: nothing here is an error the user must see)."""
        logic = self.logic
        if logic.busy or logic.session is None:
            return
        if self.can_prepare is not None and not self.can_prepare():
            return
        try:
            job = logic.submit_prepare()
        except Exception:  # noqa: BLE001 - encoding ahead is an optimisation; the Ask reports real problems
            return
        if job is not None and not self.timer.isActive():
            self.timer.start()

    def reference(self):
        index = _current_index(self.ui.referenceCombo)
        return None if index <= 0 else index

    def on_ask(self):
        logic, ui = self.logic, self.ui
        if logic.busy or logic.session is None:
            return
        query = _call(ui.queryEdit.text)
        if not query.strip():
            self.status = "Type a question first, e.g. “Segment the liver.”"
            self.refresh()
            return
        if self.before_ask is not None and not self.before_ask():
            self.status = "The model cannot run yet; press Ask to try again."
            self.refresh()
            return
        self.ahead_timer.stop()
        self.notice = ""
        use_jcm = _checked(ui.jcmCheckBox)
        beta = float(_call(ui.betaSpinBox.value))
        try:
            logic.submit_ask(query, reference=self.reference(), use_jcm=use_jcm, beta=beta)
        except Exception as exc:
            self.status = f"Error: {exc}"
            self.refresh()
            return
        self.pending_query = query
        self.status = "Thinking…" if logic.engine is not None else "Loading the model…"
        ui.progressBar.setValue(2)
        self.refresh()
        self.timer.start()

    def poll(self):
        events = self.logic.poll(wait=YIELD_MS / 1000.0)
        for event in events:
            if event.kind == "progress":
                self.status = f"{event.message[:1].upper()}{event.message[1:]}…"
                self.ui.progressBar.setValue(int(100 * event.fraction))
                self.ui.statusLabel.setText(self.status)
            elif event.kind == "engine":
                self.status = "Model loaded; thinking…" if self.logic.busy else "Model loaded."
                self.ui.deviceLabel.setText(self.logic.device_description)
                self.ui.statusLabel.setText(self.status)
                beta = getattr(self.logic.engine, "info", {}).get("beta")  # a server's model brings its own β
                if beta is not None:
                    self.ui.betaSpinBox.setValue(float(beta))
            elif event.kind == "round":
                r = event.round
                took = f"R{r.number} done in {r.timings.get('total_ms', 0) / 1000:.1f} s"
                self.status = (f"{took}: {r.entity or 'the structure'} is not on this slice, no segment."
                               if getattr(r, "absent", False) else
                               f"{took}: segment “{segments.segment_name(r.number, r.entity)}”.")
                self.ui.queryEdit.clear()
            elif event.kind == "prepared":  # quiet: no status, no history; only the slice line says so
                if event.error is None and event.timings is not None:
                    self.ui.sliceLabel.setText(f"{DEFAULT_SLICE_TEXT[:-1]}; {event.message} is ready (encoded "
                                               "ahead).")
            elif event.kind == "error":
                self.status = f"Error: {event.message}"
        if not self.logic.pending:
            self.timer.stop()
        if any(e.kind not in ("progress", "prepared") for e in events):
            self.refresh()
        return events

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until the running Ask ends (scripts, tests); True when it ended."""
        import time
        app = qt.app_instance()
        end = time.monotonic() + timeout
        while (self.logic.busy or self.timer.isActive()) and time.monotonic() < end:
            app.processEvents()
            time.sleep(0.005)
        app.processEvents()
        return not self.logic.busy

    def on_undo(self):
        try:
            last = self.logic.undo()
            self.status = f"Undid R{last.number} ({last.entity or 'unnamed'})."
        except Exception as exc:
            self.status = f"Error: {exc}"
        self.refresh()

    def on_new_session(self):
        try:
            self.logic.new_session()
            self.status = "New session started; earlier segments stay in the scene."
        except Exception as exc:
            self.status = f"Error: {exc}"
        self.refresh()

    def on_save(self):
        logic = self.logic
        if logic.session is None:
            return
        suggestion = (logic.session.volume_name or "segments") + ".seg.nrrd"
        path = self.dialogs.save_path("Save MediRound segments", suggestion)
        if not path:
            return
        try:
            seg_path, folder = logic.save_segments(path)
            self.status = f"Saved {Path(seg_path).name} and the session folder {Path(folder).name}."
        except Exception as exc:
            self.status = f"Error: {exc}"
            self.dialogs.error("MediRound", f"Saving failed: {exc}")
        self.refresh()

    def on_model_changed(self, index):
        if index == 0:
            self.ui.checkpointEdit.setText("")
            self._set_checkpoint(None)
        else:
            self.on_browse()
        self.refresh()

    def on_browse(self):
        folder = self.dialogs.folder("MediRound checkpoint folder")
        if folder:
            self.ui.checkpointEdit.setText(str(folder))
            self._set_checkpoint(str(folder))
        elif not self.logic.checkpoint:
            self.ui.modelCombo.setCurrentIndex(0)
        self.refresh()

    def on_server_changed(self):
        """Server: empty = local (this computer); a URL (+ token) = `mediround serve` there."""
        url, token = _call(self.ui.serverEdit.text).strip(), _call(self.ui.tokenEdit.text).strip()
        if (url or None, token or None) == (self.logic.server_url, self.logic.server_token):
            return
        try:
            self.logic.set_server(url, token)
            self.status = "Connects to the server on the next Ask." if url else "The model loads on the next Ask."
        except Exception as exc:
            self.status = f"Error: {exc}"
        self.ui.modelCombo.setEnabled(not url)
        self.refresh()

    def _set_checkpoint(self, folder):
        try:
            self.logic.set_checkpoint(folder)
            self.adopt_model_beta()
            self.status = "The model loads on the next Ask."
        except Exception as exc:
            self.status = f"Error: {exc}"

    def shutdown(self):
        self.timer.stop()
        self.ahead_timer.stop()
        self.unwatch_view()


def _display_answer(answer: str) -> str:
    """The answer without its closing [SEG] marker (a note that mentions [SEG] stays intact)."""
    return re.sub(r"\s*\[SEG\]\s*$", "", re.sub(r"\s*\[SEG\](?=\s*\(no \[SEG\])", "", answer or "")).strip()


# PythonQt exposes some getters as properties, PySide6 as methods.
def _call(value):
    return value() if callable(value) else value


def _current_index(combo) -> int:
    return _call(combo.currentIndex)


def _count(combo) -> int:
    return _call(combo.count)


def _checked(box) -> bool:
    return bool(_call(box.checked)) if hasattr(box, "checked") and not callable(box.checked) else bool(box.isChecked())


def _segment_color(logic, number):
    node = logic.segmentation_node
    if node is None:
        return None
    segment = node.GetSegmentation().GetSegment(segments.segment_id(number))
    if segment is None:
        return None
    r, g, b = segment.GetColor()
    return "#%02x%02x%02x" % (int(r * 255), int(g * 255), int(b * 255))
