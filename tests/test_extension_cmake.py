"""The extension's CMake files: metadata, and every file they list exists and every file that must ship is listed."""

import fnmatch
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MediRoundSlicer"
sys.path.insert(0, str(ROOT))
from MediRoundCore.checkpoint_info import DEFAULT_CHECKPOINT  # noqa: E402  (no torch import)
sys.path.insert(0, str(MODULE))


def _commands(path: Path):
    """(name, [args]) for each CMake command, comments stripped, quotes removed, ${VAR} expanded from set()."""
    text = "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("set(EXTENSION") else line
                     for line in path.read_text().splitlines())
    variables, out = {"MODULE_NAME": None}, []
    for match in re.finditer(r"(\w+)\s*\((.*?)\)", text, re.S):
        name = match.group(1)
        args = re.findall(r'"[^"]*"|[^\s"]+', match.group(2))
        args = [a[1:-1] if a.startswith('"') else a for a in args]
        expanded = []
        for a in args:
            value = re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1)) or m.group(0), a)
            expanded.append(value)
        if name.lower() == "set" and expanded:
            variables[expanded[0]] = " ".join(expanded[1:])
        out.append((name, expanded))
    return out, variables


def _section(args, key, keys):
    """The values after `key` up to the next keyword in `keys`."""
    if key not in args:
        return []
    values = []
    for a in args[args.index(key) + 1:]:
        if a in keys:
            break
        values.append(a)
    return values


def test_top_level_metadata():
    commands, variables = _commands(ROOT / "CMakeLists.txt")
    assert variables["EXTENSION_CATEGORY"] == "Segmentation"
    assert variables["EXTENSION_DEPENDS"] == "PyTorch"
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_DESCRIPTION", "EXTENSION_CONTRIBUTORS", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        assert variables.get(key), key
    assert ("add_subdirectory", ["MediRoundSlicer"]) in commands
    assert any(name == "find_package" and args[0] == "Slicer" for name, args in commands)
    # icon and screenshot URLs point at files of this repository
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in variables[key].split():
            relative = url.split("/main/", 1)[1]
            assert (ROOT / relative).is_file(), url
    from PIL import Image
    with Image.open(MODULE / "Resources" / "Icons" / "MediRound.png") as icon:
        assert icon.size == (128, 128)


def test_module_lists_every_script_and_resource():
    commands, variables = _commands(MODULE / "CMakeLists.txt")
    variables["MODULE_NAME"] = "MediRound"
    commands, variables = _commands(MODULE / "CMakeLists.txt")  # second pass: MODULE_NAME is known
    build = [args for name, args in commands if name == "slicerMacroBuildScriptedModule"]
    assert len(build) == 1
    keys = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS"}
    assert _section(build[0], "NAME", keys) == ["MediRound"] and "WITH_GENERIC_TESTS" in build[0]
    scripts = " ".join(_section(build[0], "SCRIPTS", keys))
    scripts = re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], scripts).split()
    resources = re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)],
                       " ".join(_section(build[0], "RESOURCES", keys))).split()
    for path in scripts + resources:
        assert (MODULE / path).is_file(), f"{path} is listed but missing"
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    on_disk -= {"update_core_file_list.py", "make_screenshot.py"}  # developer tools, not part of the module
    assert sorted(on_disk - set(scripts)) == [], "module scripts missing from SCRIPTS"
    shipped = {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert sorted(shipped - set(resources)) == [], "resources missing from RESOURCES"
    assert any(name == "slicer_add_python_unittest" and args == ["SCRIPT", "MediRound.py"]
               for name, args in commands)


def test_core_package_ships_completely():
    import update_core_file_list as gen

    cmake = MODULE / "MediRoundCoreFiles.cmake"
    assert cmake.read_text() == gen.render(), (
        "MediRoundSlicer/MediRoundCoreFiles.cmake is out of date: run python MediRoundSlicer/update_core_file_list.py")
    commands, variables = _commands(cmake)
    scripts = variables["MEDIROUND_CORE_SCRIPTS"].split()
    for path in scripts:
        assert (ROOT / path).is_file(), path
    assert "MediRoundCore/engine.py" in scripts and "MediRoundCore/__init__.py" in scripts
    patterns = variables["MEDIROUND_CORE_RESOURCE_PATTERNS"].split()
    default = DEFAULT_CHECKPOINT.relative_to(ROOT).as_posix()
    assert f"{default}/*" in patterns  # the default model's folder, and no other model's
    assert not [p for p in patterns if p.startswith("MediRoundCore/weights/") and p != f"{default}/*"]
    data_files = [p.relative_to(ROOT).as_posix() for p in (ROOT / "MediRoundCore").rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
                  and not p.name.startswith(".")
                  and not (p.parent.parent.name == "weights" and p.parent != DEFAULT_CHECKPOINT)]
    unshipped = [f for f in data_files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert unshipped == [], "package data not covered by MEDIROUND_CORE_RESOURCE_PATTERNS"
    # the module CMakeLists copies them into the build tree's qt-scripted-modules, and installs them only once:
    # slicerMacroBuildScriptedModule installs that whole folder (CTK's ctkMacroCompilePythonScript with
    # NO_INSTALL_SUBDIR), so no second ctkMacroCompilePythonScript or install() may name it
    module_commands, _ = _commands(MODULE / "CMakeLists.txt")
    names = [name for name, _ in module_commands]
    assert "ctkMacroCompilePythonScript" not in names and "install" not in names
    files = [args for name, args in module_commands if name == "set" and args[:1] == ["MEDIROUND_CORE_FILES"]]
    assert files == [["MEDIROUND_CORE_FILES", "${MEDIROUND_CORE_SCRIPTS}"]]
    copy = [args for name, args in module_commands if name == "add_custom_command"]
    assert copy and any("${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${file}" in a for a in copy[0])


STAND_IN = r'''
cmake_minimum_required(VERSION 3.16)
project(MediRoundInstallCheck NONE)
# Slicer's variables and macros, reduced to what decides what gets installed:
# CTK CMake/ctkMacroCompilePythonScript.cmake copies SCRIPTS (from SOURCE_DIR) and RESOURCES into
# DESTINATION_DIR and installs that folder (its contents with NO_INSTALL_SUBDIR); Slicer
# CMake/SlicerMacroBuildScriptedModule.cmake calls it with the qt-scripted-modules folder and NO_INSTALL_SUBDIR.
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(BUILD_TESTING OFF)
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  set(_copied)
  foreach(file IN LISTS MY_SCRIPTS MY_RESOURCES)
    add_custom_command(OUTPUT "${MY_DESTINATION_DIR}/${file}" DEPENDS "${MY_SOURCE_DIR}/${file}"
      COMMAND ${CMAKE_COMMAND} -E copy "${MY_SOURCE_DIR}/${file}" "${MY_DESTINATION_DIR}/${file}")
    list(APPEND _copied "${MY_DESTINATION_DIR}/${file}")
  endforeach()
  add_custom_target(Copy${MY_TARGET_NAME}PythonFiles ALL DEPENDS ${_copied})
  if(MY_NO_INSTALL_SUBDIR)
    install(DIRECTORY "${MY_DESTINATION_DIR}/" DESTINATION "${MY_INSTALL_DIR}")
  else()
    install(DIRECTORY "${MY_DESTINATION_DIR}" DESTINATION "${MY_INSTALL_DIR}")
  endif()
endmacro()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  ctkMacroCompilePythonScript(TARGET_NAME ${MY_SLICER_NAME} SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}" DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} NO_INSTALL_SUBDIR)
endmacro()
add_subdirectory("@MODULE@" MediRoundSlicer)
'''


def test_cmake_install_ships_every_file_once(tmp_path):
    """Configure, build and install the module with CMake (Slicer's macros reduced to their copy and install
    rules): the core and the module are installed, each file by exactly one install rule."""
    import shutil
    import subprocess

    import pytest

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed: the CMake install check is skipped")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "CMakeLists.txt").write_text(STAND_IN.replace("@MODULE@", MODULE.as_posix()))
    build, prefix = tmp_path / "build", tmp_path / "prefix"
    for cmd in ([cmake, "-S", str(tmp_path / "src"), "-B", str(build)], [cmake, "--build", str(build)],
                [cmake, "--install", str(build), "--prefix", str(prefix)]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    installed = (build / "install_manifest.txt").read_text().split()
    duplicates = sorted({f for f in installed if installed.count(f) > 1})
    assert duplicates == [], f"{len(duplicates)} files installed twice, e.g. {duplicates[:3]}"
    root = prefix / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for path in ("MediRound.py", "MediRoundLib/panel.py", "Resources/UI/MediRound.ui", "MediRoundCore/engine.py",
                 "MediRoundCore/checkpoint_info.py",
                 DEFAULT_CHECKPOINT.relative_to(ROOT).as_posix() + "/model.safetensors"):
        assert (root / path).is_file(), path
    shipped_models = sorted(p.name for p in (root / "MediRoundCore" / "weights").iterdir())
    assert shipped_models == [DEFAULT_CHECKPOINT.name]  # the default model only
