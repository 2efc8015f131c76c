"""Builds and caches the C++ CPU extensions (``kernels/cpu``, ``kernels/cpu_linear``, ``kernels/cpu_quant``).

Each extension is compiled with ``torch.utils.cpp_extension`` (``-march=native`` and OpenMP, 15-30 s) into
``<cache>/kernels/<prefix>-<key>``, where ``<cache>`` is ``$SLIMLM_CACHE_DIR`` or ``~/.cache/slimlm`` and the
key hashes the sources, the torch and Python versions, the compiler flags and the CPU's model and feature
flags, so a build for one CPU is never loaded on another. A finished build leaves a ``build.ok`` marker; a
later process that finds it imports the ``.so`` directly (about 1 ms, no ninja run). Concurrent first builds
are serialised by an ``flock`` on ``<dir>/build.flock``, which the OS releases when its holder dies; the
holder deletes a ``lock`` file that cpp_extension left behind when a build was killed (Ctrl-C, OOM), which
would otherwise make every later build wait on it forever.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

__all__ = ["build_dir", "build_key", "cache_root", "cpu_flags", "cpu_signature", "load_extension"]

_DONE = "build.ok"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo, sorted (or the platform's best equivalent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() + platform.machine()


def cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's vendor, model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [
        line
        for line in text.splitlines()
        if line.startswith(("flags", "model name", "Features", "CPU part", "vendor_id"))
    ]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def cache_root() -> Path:
    """``$SLIMLM_CACHE_DIR/kernels`` or ``~/.cache/slimlm/kernels``."""
    root = os.environ.get("SLIMLM_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimlm" / "kernels"


def build_key(sources: Sequence[Path], flags: Sequence[str], cpu: str | None = None) -> str:
    """16 hex digits over the sources (names and bytes), torch and Python versions, ``flags`` and the CPU."""
    import torch

    h = hashlib.sha256()
    for src in sources:
        h.update(Path(src).name.encode() + b"\0" + Path(src).read_bytes() + b"\0")
    for part in (torch.__version__, sys.version, " ".join(flags), cpu_signature() if cpu is None else cpu):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def build_dir(prefix: str, key: str) -> Path:
    return cache_root() / f"{prefix}-{key}"


def _import_so(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``directory`` and clears cpp_extension's stale ``lock`` file."""
    try:
        import fcntl
    except ImportError:  # not POSIX: cpp_extension's own lock file is all there is
        yield
        return
    with open(directory / "build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # Every builder holds the flock, so a lock file seen now belongs to a builder that died.
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_extension(
    prefix: str,
    sources: Sequence[Path],
    cflags: Sequence[str],
    ldflags: Sequence[str] = ("-fopenmp",),
    key: str | None = None,
    depends: Sequence[Path] = (),
    verbose: bool = False,
) -> ModuleType:
    """Imports extension ``slimlm_<prefix>_<key>`` (built first if no finished build is cached).

    ``key`` defaults to :func:`build_key` over the sources, the headers they include (``depends``) and
    ``cflags + ldflags``. Not thread-safe by itself: callers keep their own lock and module cache. Raises
    whatever the build raises.
    """
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    if key is None:
        key = build_key([*sources, *depends], [*cflags, *ldflags])
    name = f"slimlm_{prefix}_{key}".replace("-", "_")
    directory = build_dir(prefix, key)
    so = directory / f"{name}.so"
    if (directory / _DONE).exists() and so.exists():
        return _import_so(name, so)
    try:
        return _build(name, so, sources, cflags, ldflags, verbose)
    except (RuntimeError, OSError):
        if directory.exists():
            raise
    return _build(name, so, sources, cflags, ldflags, verbose)  # it vanished under a concurrent cleanup


def _build(
    name: str, so: Path, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str], verbose: bool
) -> ModuleType:
    """Builds with cpp_extension under the directory's flock and marks the build finished; imports instead if
    another process finished it while this one waited."""
    import torch
    from torch.utils import cpp_extension

    directory = so.parent
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory):
        if (directory / _DONE).exists() and so.exists():
            return _import_so(name, so)
        module = cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=list(cflags),  # cpp_extension extends these lists in place
            extra_ldflags=list(ldflags),
            build_directory=str(directory),
            verbose=verbose,
        )
        tmp = directory / f"{_DONE}.{os.getpid()}"
        tmp.write_text(torch.__version__ + "\n")
        tmp.replace(directory / _DONE)
    return module
