"""Fused calls compiled once per machine, loaded by every other worker, replacement and restart.

    <root>/compile/<env>/inductor/         TORCHINDUCTOR_CACHE_DIR of every worker: built kernels,
                                           FX-graph and AOTAutograd caches
    <root>/compile/<env>/calls/<key>.bin   one AOT-compiled call (torch.compile(...).aot_compile)
    <root>/compile/<env>/calls/<key>.json  ready marker, written last: what the key is made of, the
                                           .bin's size and sha256, hashes of the sources dynamo traced
    <root>/compile/<env>/calls/<key>.lock  flock, held by the one process compiling that key

``root`` is the config's ``compile_cache_dir``, else ``$XDG_CACHE_HOME/cohort``, else
``~/.cache/cohort``; mode 0700, because an artifact is a pickle that a worker loads. ``<env>``
names what an artifact cannot cross (torch, Python, device, GPU, CUDA, Triton): another torch
starts an empty directory. Everything else that decides the compiled code goes into ``<key>``:
the factory and its kwargs and source, the module's structure, the loss, the precision,
cohort's traced code, the kind of call and its shapes, the compile mode. A traced module
whose source changed since (a user's ``forward``) is caught at load by the marker's hashes.

One process compiles a key while the others wait on its lock (the kernel drops the lock if
that process dies), then load. Writes are atomic and the marker comes last, so a reader
sees a whole entry or none; an entry that fails any check is moved aside (``*.bad``) with a
warning and compiled again. torch 2.13's AOT API is young: this module is the one place
that uses it, and any failure here falls back to plain ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("cohort.worker")
FORMAT = 1  # bump when what cohort puts into an artifact changes
LOCK_TIMEOUT_S = 1800.0
BACKEND_ENV = "COHORT_COMPILE_BACKEND"  # another torch.compile backend ("aot_eager": fast, for debugging)


def cache_root(configured: str = "") -> Path:
    """Where compiled calls live: the config's ``compile_cache_dir``, else the XDG cache directory."""
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cohort"


def env_tag(device: torch.device) -> str:
    """What a compiled artifact cannot cross; torch itself refuses a different version on load."""
    parts = [f"torch{torch.__version__}", f"py{platform.python_version()}", device.type,
             os.environ.get(BACKEND_ENV, "inductor")]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        parts += [torch.cuda.get_device_name(device).replace(" ", "_"), f"sm{major}{minor}", f"cuda{torch.version.cuda}"]
        try:
            from torch.utils._triton import get_triton_version

            parts.append("triton{}.{}".format(*get_triton_version((0, 0))))
        except Exception:
            pass
    return "-".join(parts)


def source_hash(*objects: Any) -> str:
    """sha256 of the source files that define ``objects`` (modules, classes or functions)."""
    digest = hashlib.sha256()
    for obj in objects:
        module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
        try:
            digest.update(inspect.getsource(module).encode())
        except (OSError, TypeError):  # no source (a C extension, a REPL): its name at least
            digest.update(repr(obj).encode())
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """A temporary file in the same directory, fsync, rename: readers see all of it or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def input_guards(entries: Any) -> list[bool]:
    """Keep the guards on the call's own tensors (shape, stride, dtype, device) and on global state
    (grad mode); drop those on torch's internals and the module object, which cannot be saved and
    which the cache key covers."""
    return [g.guard_type in ("GLOBAL_STATE", "SHAPE_ENV")
            or (g.guard_type == "TENSOR_MATCH" and not g.is_global and not isinstance(g.value, torch.nn.Parameter))
            for g in entries]


def aot_compile(fn: Callable[..., Any], args: tuple[Any, ...], mode: str) -> Any:
    """``torch.compile(fn).aot_compile`` for one fixed call shape, with only the guards that can travel
    (``mode`` and ``options`` cannot both be given: the mode's options are spelled out)."""
    import torch._inductor

    backend = os.environ.get(BACKEND_ENV, "inductor")
    if backend != "inductor":
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend,
                                 options={"guard_filter_fn": input_guards})
        return compiled.aot_compile((args, {}))
    options = {**torch._inductor.list_mode_options(mode or "default"), "guard_filter_fn": input_guards}
    return torch.compile(fn, fullgraph=True, dynamic=False, options=options).aot_compile((args, {}))


def closure_data(fn: Callable[..., Any], owner: Any) -> dict[str, Any]:
    """What an artifact must not pickle but take from the loading process: the objects ``fn`` closes
    over (vmap wrappers, bound methods, the module) and their owner. A loading worker builds the
    same closure for its eager fallback, so it has them all, in the same order."""
    data = {f"closure{i}": cell.cell_contents for i, cell in enumerate(fn.__closure__ or ())}
    return {**data, "owner": owner}


def _traced_sources(compiled: Any) -> dict[str, str]:
    """Hashes of the non-torch, non-standard-library modules dynamo traced (a user's forward, cohort's code)."""
    out = {}
    for source in compiled.source_info().inlined_sources:
        module = sys.modules.get(source.module)
        if source.module.split(".")[0] == "torch" or module is None or _is_stdlib(module):
            continue
        out[source.module] = hashlib.sha256(source.content.encode()).hexdigest()
    return out


def _is_stdlib(module: Any) -> bool:
    path = getattr(module, "__file__", None) or ""
    return path.startswith(sys.base_prefix) and "site-packages" not in path


def _sources_unchanged(recorded: dict[str, str]) -> bool:
    for name, digest in recorded.items():
        try:
            now = hashlib.sha256(inspect.getsource(importlib.import_module(name)).encode()).hexdigest()
        except Exception:
            return False
        if now != digest:
            return False
    return True


class CompileCache:
    """AOT-compiled calls on disk: one process compiles a key while the others wait, then load it."""

    def __init__(self, device: torch.device, root: str = "") -> None:
        base = cache_root(root)
        self.dir = base / "compile" / env_tag(device)
        self.calls = self.dir / "calls"
        self.calls.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o700)  # artifacts are pickles: whoever can write here runs code in the workers
        self.loaded = 0
        self.compiled = 0

    @property
    def inductor_dir(self) -> str:
        """The worker's ``TORCHINDUCTOR_CACHE_DIR``: built kernels shared by every worker."""
        return str(self.dir / "inductor")

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def markers(self) -> Iterator[dict[str, Any]]:
        """Every ready entry's marker (what a worker may load at start without waiting for a call)."""
        for path in sorted(self.calls.glob("*.json")):
            with contextlib.suppress(Exception):
                yield json.loads(path.read_bytes())

    def load(self, parts: dict[str, Any], external_data: dict[str, Any]) -> Any:
        """The compiled call for ``parts`` if a whole, current entry is on disk, else None."""
        key = self.key(parts)
        marker_path, bin_path = self.calls / f"{key}.json", self.calls / f"{key}.bin"
        try:
            marker = json.loads(marker_path.read_bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:
            return self._discard(key, f"unreadable marker: {exc}")
        try:
            data = bin_path.read_bytes()
        except FileNotFoundError:
            return self._discard(key, "marker without artifact")
        if len(data) != marker.get("bytes") or hashlib.sha256(data).hexdigest() != marker.get("sha256"):
            return self._discard(key, "checksum mismatch (a corrupt or truncated file)")
        if not _sources_unchanged(marker.get("sources", {})):
            return self._discard(key, "a traced source changed since it was compiled")
        try:
            compiled = torch.compiler.load_compiled_function(io.BytesIO(data), external_data=external_data)
        except Exception as exc:  # EOFError, UnpicklingError, versions, missing references, ...
            return self._discard(key, f"{type(exc).__name__}: {exc}")
        self.loaded += 1
        return compiled

    def get(self, parts: dict[str, Any], compile_fn: Callable[[], Any], external_data: dict[str, Any],
            waiting: Callable[[], None] = lambda: None) -> tuple[Any, bool]:
        """``(call, loaded)``: loaded if some process made it, else compiled here under the key's lock
        and saved. ``waiting`` is called while another process holds the lock."""
        found = self.load(parts, external_data)
        if found is not None:
            return found, True
        key = self.key(parts)
        with self._locked(key, waiting):
            found = self.load(parts, external_data)  # made by the process we waited for
            if found is not None:
                return found, True
            began = time.perf_counter()
            compiled = compile_fn()
            seconds = time.perf_counter() - began
            data = type(compiled).serialize(compiled, external_data).serialized_data
            atomic_write(self.calls / f"{key}.bin", data)
            marker = {"parts": parts, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                      "sources": _traced_sources(compiled), "compile_s": round(seconds, 3), "created": time.time()}
            atomic_write(self.calls / f"{key}.json", json.dumps(marker, indent=1, default=str).encode())
            self.compiled += 1
            return compiled, False

    def _discard(self, key: str, why: str) -> None:
        """Move a bad entry aside (kept for a post-mortem) so that the key compiles again."""
        log.warning("compile cache: entry %s unusable (%s); compiling it again", key, why)
        for suffix in (".json", ".bin"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.calls / f"{key}{suffix}", self.calls / f"{key}{suffix}.bad")
        return None

    @contextlib.contextmanager
    def _locked(self, key: str, waiting: Callable[[], None]) -> Iterator[None]:
        """flock on ``<key>.lock``, polled so that a waiting worker stays responsive."""
        with open(self.calls / f"{key}.lock", "a") as lock:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"compile cache: {key} locked for over {LOCK_TIMEOUT_S:.0f} s") from None
                    waiting()
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
