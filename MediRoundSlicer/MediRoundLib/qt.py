"""A thin `qt` alias: Slicer's PythonQt `qt` module inside Slicer, else the same names from PySide6.

Only what the chat panel uses is needed: widgets, QTimer, QColor, QFileDialog, QMessageBox, and `load_ui`.
"""

from __future__ import annotations

try:  # inside Slicer
    import qt as _slicer_qt  # type: ignore[import-not-found]

    if not hasattr(_slicer_qt, "QWidget"):
        raise ImportError
    BACKEND = "PythonQt"

    def __getattr__(name):
        return getattr(_slicer_qt, name)

    def load_ui(path):
        import slicer
        return slicer.util.loadUI(str(path))

except ImportError:
    from PySide6 import QtCore, QtGui, QtWidgets  # noqa: F401

    BACKEND = "PySide6"
    _MODULES = (QtWidgets, QtCore, QtGui)

    def __getattr__(name):
        for module in _MODULES:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)

    def load_ui(path):
        from PySide6.QtCore import QFile, QIODevice
        from PySide6.QtUiTools import QUiLoader

        handle = QFile(str(path))
        if not handle.open(QIODevice.OpenModeFlag.ReadOnly):
            raise OSError(f"cannot open {path}")
        try:
            widget = QUiLoader().load(handle)
        finally:
            handle.close()
        if widget is None:
            raise OSError(f"cannot load the user interface {path}")
        return widget


def app_instance():
    """The running QApplication (created offscreen-capable outside Slicer when there is none)."""
    if BACKEND == "PythonQt":
        import slicer
        return slicer.app
    from PySide6.QtWidgets import QApplication
    return QApplication.instance() or QApplication([])
