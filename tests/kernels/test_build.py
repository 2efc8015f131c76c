"""The extension cache: a build killed half-way must not block later builds."""

from __future__ import annotations

import threading

from slimlm.kernels import build

_SOURCE = """
#include <Python.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "%s", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_%s(void) { return PyModule_Create(&def); }
"""


def test_a_lock_file_left_by_a_killed_build_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE_DIR", str(tmp_path / "cache"))
    key = "stale0lock0test0"
    name = f"slimlm_stale_{key}"
    src = tmp_path / "tiny.cpp"
    src.write_text(_SOURCE % (name, name))
    directory = build.build_dir("stale", key)
    directory.mkdir(parents=True)
    (directory / "lock").touch()  # what cpp_extension leaves when its build process is killed

    result = {}
    worker = threading.Thread(
        target=lambda: result.update(module=build.load_extension("stale", [src], [], [], key=key)), daemon=True
    )
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "load_extension waited on the dead build's lock file"
    assert result["module"].__name__ == name
    assert (directory / "build.ok").exists() and not (directory / "lock").exists()
    # A second load imports the finished build.
    assert build.load_extension("stale", [src], [], [], key=key).__name__ == name
