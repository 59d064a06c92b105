"""The Slicer versions we claim (docs/slicer.md): 5.8 (Python 3.9, where pip resolves transformers 4.57.x)
and 5.10+ (Python 3.12, transformers 5.x). The bundled model must load and answer the same with both
transformers; the shipped code must be Python 3.9 syntax; an older Slicer gets a message, not a traceback."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MediRoundSlicer"), str(ROOT)]

from MediRoundLib import dependencies  # noqa: E402

COMPAT_VENV = Path(os.environ.get("MEDIROUND_COMPAT_VENV",
                                  Path.home() / ".cache" / "mediround-venvs" / "transformers-4.57"))
COMPAT_PACKAGES = ["torch==2.13.0", "transformers==4.57.*", "tokenizers", "safetensors", "numpy",
                   "segment-anything", "SimpleITK", "pynrrd", "pillow"]


def _shipped_python_files():
    for top in ("MediRoundCore", "MediRoundSlicer"):
        yield from (p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def test_shipped_code_is_python_39_syntax():
    bad = []
    for path in _shipped_python_files():
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
        except SyntaxError as exc:
            bad.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert bad == []


def _union_annotations(tree) -> list[int]:
    """Lines of annotations written `X | Y`: evaluated when the function or class is defined, a TypeError on
    Python 3.9 unless the module postpones annotations."""
    def unions(node):
        return node is not None and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotated = [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs] + [node.returns]
            annotated += [a.annotation for a in (args.vararg, args.kwarg) if a is not None]
            lines += [node.lineno] if any(unions(a) for a in annotated) else []
        elif isinstance(node, ast.AnnAssign) and unions(node.annotation):
            lines.append(node.lineno)
    return lines


def _postpones_annotations(tree) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
               for n in tree.body)


def test_union_annotations_are_postponed_for_python_39():
    """`def f(x: str | None)` parses on 3.9 but fails when defined: such modules need the __future__ import."""
    bad = []
    for path in _shipped_python_files():
        tree = ast.parse(path.read_text())
        if not _postpones_annotations(tree) and (lines := _union_annotations(tree)):
            bad.append(f"{path.relative_to(ROOT)}:{lines[0]}")
    assert bad == []
    assert _union_annotations(ast.parse("def f(x: int | None) -> None: pass")) == [1]
    assert _postpones_annotations(ast.parse("from __future__ import annotations"))


def test_too_old_python_gets_a_message():
    assert dependencies.python_problem((3, 9, 10)) == "" and dependencies.python_problem((3, 12, 4)) == ""
    message = dependencies.python_problem((3, 6, 7))
    assert "3D Slicer 5.8 or later" in message and "Python 3.6.7" in message


def test_older_slicer_gets_a_note_not_a_refusal():
    assert dependencies.slicer_version_warning(5, 8) == "" and dependencies.slicer_version_warning(5, 10) == ""
    assert "tested on Slicer 5.8 and later" in dependencies.slicer_version_warning(5, 6)
    assert dependencies.slicer_version_warning(None, None) == ""


def _compat_python() -> Path:
    """A throwaway venv (cached under ~/.cache) with transformers 4.57.x and the same torch."""
    python = COMPAT_VENV / "bin" / "python"
    stamp = COMPAT_VENV / ".mediround-packages"
    if python.is_file() and stamp.is_file() and stamp.read_text() == "\n".join(COMPAT_PACKAGES):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(COMPAT_VENV)], check=True, timeout=300)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *COMPAT_PACKAGES], capture_output=True,
                          text=True, timeout=1500)
    if done.returncode != 0:
        pytest.skip(f"could not install transformers 4.57 into {COMPAT_VENV}: {done.stderr.strip()[-300:]}")
    stamp.write_text("\n".join(COMPAT_PACKAGES))
    return python


def _ask(python) -> dict:
    done = subprocess.run([str(python), str(ROOT / "tests" / "compat_ask.py")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bundled_model_answers_the_same_with_transformers_4_57_and_5():
    old = _ask(_compat_python())
    new = _ask(sys.executable)
    assert old["transformers"].startswith("4.57.") and new["transformers"].startswith("5.")
    assert [r["entity"] for r in old["rounds"]] == ["left kidney", "lesion in the left kidney", "gallbladder"]
    assert old["rounds"] == new["rounds"]
