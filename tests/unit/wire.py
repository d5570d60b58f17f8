"""Every name of the wire layer (messages, codec, tensors, spec, bank handles) in one namespace, for tests."""

from __future__ import annotations

from types import SimpleNamespace

from core import bank, codec, cuda_ipc, messages, spec, tensors

P = SimpleNamespace(**{name: getattr(module, name) for module in (tensors, spec, cuda_ipc, bank, messages, codec)
                       for name in dir(module) if not name.startswith("__")})
