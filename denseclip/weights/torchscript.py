"""The weights of a TorchScript archive, read without running any of its code.

``torch.jit.load`` compiles the archive's ``code/`` and runs scripted methods while it loads
(a scripted ``__setstate__`` runs on every load), so opening an untrusted ``.pt`` with it is
running untrusted code. OpenAI's CLIP releases are TorchScript archives; their weights are
all this package needs. :func:`read_torchscript_weights` unpickles the archive's
``data.pkl`` with an unpickler that knows only tensors (storages come from the archive's
``data/<key>`` records, tensors are rebuilt from them as strided views), plain containers and
the archive's ``__torch__.*`` classes, which become inert :class:`ScriptObject` records holding
their pickled state. The parameter and buffer names of each scripted module class are read
as literals from the class's source text in ``code/`` (``__parameters__`` /
``__buffers__``); the source is never compiled nor executed. The result is the state dict
``torch.jit.load(path).state_dict()`` gives: dotted names of parameters and buffers.

Anything else — another global, a module class with its own ``__setstate__`` or a state that
is not an attribute dict, a storage whose record is missing or has the wrong size — raises
:class:`TorchScriptUnreadable` and nothing is loaded.
"""

from __future__ import annotations

import ast
import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

MAX_PICKLE_BYTES = 256 << 20  # data.pkl of a CLIP release is well under 1 MiB

_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class TorchScriptUnreadable(ValueError):
    """The archive holds something the restricted reader does not materialise."""


class ScriptObject:
    """An instance of one of the archive's ``__torch__.*`` classes: its qualified class name
    and the state the archive stores for it, nothing more (no scripted method is run)."""

    qualname = "__torch__"

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:  # the pickle's BUILD: keep, never interpret
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor_v2(storage: torch.Tensor, offset: int, size: tuple, stride: tuple,
                       requires_grad: bool = False, hooks: Any = None,
                       metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise TorchScriptUnreadable("a tensor without a storage record")
    try:
        return storage.as_strided(tuple(size), tuple(stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as e:
        raise TorchScriptUnreadable(f"a tensor does not fit its storage: {e}") from None


def _identity(value: Any, *_: Any) -> Any:
    return value


# (module, name) → what the pickle gets for it; everything else is refused.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix = zf, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in _DTYPES:
            return _StorageType(_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise TorchScriptUnreadable(f"refers to {module}.{name}, which is not a weight")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise TorchScriptUnreadable(f"unknown persistent record {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = self._storage(key, kind.dtype, numel)
        return self.storages[key]

    def _storage(self, key: str, dtype: torch.dtype, numel: Any) -> torch.Tensor:
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise TorchScriptUnreadable(f"storage record {name} is missing") from None
        size = torch.empty((), dtype=dtype).element_size()
        if not isinstance(numel, int) or numel < 0 or info.file_size != numel * size:
            raise TorchScriptUnreadable(f"storage record {name} holds {info.file_size} bytes, "
                                        f"not {numel} elements of {dtype}")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(self.zf.read(name)), dtype=dtype)


_CLASS = re.compile(r"^class (\w+)\((\w*)\):\s*$", re.M)
_LIST = re.compile(r"^  (__parameters__|__buffers__) = (\[.*\])\s*$", re.M)


class _Classes:
    """Parameter and buffer names of the archive's scripted classes, from ``code/``'s text."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str) -> None:
        self.zf, self.prefix = zf, prefix
        self.files: dict[str, dict[str, tuple[str, str]]] = {}  # file → class → (base, body)

    def _file(self, module: str) -> dict[str, tuple[str, str]]:
        name = f"{self.prefix}code/{module.replace('.', '/')}.py"
        if name not in self.files:
            try:
                text = self.zf.read(name).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                raise TorchScriptUnreadable(f"no readable source {name}") from None
            heads = list(_CLASS.finditer(text))
            self.files[name] = {
                m[1]: (m[2], text[m.end(): heads[i + 1].start() if i + 1 < len(heads)
                                  else len(text)])
                for i, m in enumerate(heads)}
        return self.files[name]

    def slots(self, qualname: str) -> tuple[list[str], list[str]] | None:
        """(parameters, buffers) of a module class; None for a class that is no module."""
        module, _, name = qualname.rpartition(".")
        found = self._file(module).get(name)
        if found is None:
            raise TorchScriptUnreadable(f"class {qualname} has no source in the archive")
        base, body = found
        if base != "Module":
            return None
        if re.search(r"^  def __setstate__\(", body, re.M):
            raise TorchScriptUnreadable(f"{qualname} restores itself with a scripted "
                                        f"__setstate__")
        lists = {k: ast.literal_eval(v) for k, v in _LIST.findall(body)}
        if set(lists) != {"__parameters__", "__buffers__"}:
            raise TorchScriptUnreadable(f"{qualname} does not list its parameters and buffers")
        return lists["__parameters__"], lists["__buffers__"]


def _state_dict(obj: ScriptObject, classes: _Classes, prefix: str,
                out: dict[str, torch.Tensor], depth: int = 0) -> None:
    if depth > 200:
        raise TorchScriptUnreadable("modules nested deeper than 200 levels")
    slots = classes.slots(obj.qualname)
    if slots is None:
        return
    state = obj.state
    if not isinstance(state, dict):
        raise TorchScriptUnreadable(f"{obj.qualname} stores {type(state).__name__} state, "
                                    f"not its attributes")
    params, buffers = slots
    for names in (params, buffers):
        for name in names:
            value = state.get(name)
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif value is not None:
                raise TorchScriptUnreadable(f"{prefix}{name} is not a tensor")
    for name, value in state.items():
        if isinstance(value, ScriptObject):
            _state_dict(value, classes, f"{prefix}{name}.", out, depth + 1)


def read_torchscript_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of the TorchScript archive at ``path`` (parameters and buffers by
    dotted name, as ``torch.jit.load(path).state_dict()``), read without executing any of
    the archive's code. Raises :class:`TorchScriptUnreadable` for anything it cannot read
    that way."""
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise TorchScriptUnreadable("not exactly one data.pkl at the archive's top level")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            order = zf.read(f"{prefix}byteorder").decode().strip()
        except KeyError:
            order = "little"
        if order != "little":
            raise TorchScriptUnreadable(f"{order}-endian tensors")
        if zf.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
            raise TorchScriptUnreadable("data.pkl is implausibly large")
        unpickler = _Unpickler(zf.read(pickles[0]), zf, prefix)
        try:
            root = unpickler.load()
        except TorchScriptUnreadable:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed pickle, whatever the error
            raise TorchScriptUnreadable(f"malformed data.pkl: {e}") from None
        if not isinstance(root, ScriptObject):
            raise TorchScriptUnreadable("data.pkl does not hold a scripted module")
        out: dict[str, torch.Tensor] = {}
        _state_dict(root, _Classes(zf, prefix), "", out)
    return out
