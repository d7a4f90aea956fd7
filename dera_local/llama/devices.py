"""ggml's devices and its RPC backend, through ctypes on the libraries the llama-cpp-python
wheel ships (llama-cpp-python binds neither: its own `rpc_servers` parameter has done
nothing since llama.cpp moved RPC to device registration, llama-cpp-python issue #1914).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llama_cpp

from ..errors import RuntimeFailure
from . import log as llama_log

# enum ggml_backend_dev_type (ggml-backend.h)
CPU, GPU, IGPU, ACCEL, META = range(5)

ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)  # ggml_abort_callback_t


def _library_dir() -> Path:
    return Path(llama_cpp.__file__).resolve().parent / "lib"


def _open(name: str) -> ctypes.CDLL | None:
    """The copy of lib`name` that libllama itself uses. The wheel ships libggml.so,
    libggml.so.0 and libggml.so.0.x as separate files (a zip keeps no symlinks), and
    each file opened is another copy with its own state (device registry, abort
    callback): libllama links the SONAME one, lib*.so.0."""
    folder = _library_dir()
    soname = folder / f"lib{name}.so.0"
    matches = [soname] if soname.exists() else sorted(folder.glob(f"lib{name}.*"))
    if not matches:
        return None
    return ctypes.CDLL(str(matches[0]), mode=ctypes.RTLD_GLOBAL)


def _declare(lib: ctypes.CDLL, name: str, restype, *argtypes):
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


@cache
def _ggml():
    lib = _open("ggml")
    if lib is None:  # pragma: no cover - every llama-cpp-python wheel ships it
        raise RuntimeFailure("llama-cpp-python's libggml was not found")
    p = ctypes.c_void_p
    size = ctypes.c_size_t
    return {
        "count": _declare(lib, "ggml_backend_dev_count", size),
        "get": _declare(lib, "ggml_backend_dev_get", p, size),
        "name": _declare(lib, "ggml_backend_dev_name", ctypes.c_char_p, p),
        "description": _declare(lib, "ggml_backend_dev_description", ctypes.c_char_p, p),
        "type": _declare(lib, "ggml_backend_dev_type", ctypes.c_int, p),
        "memory": _declare(
            lib, "ggml_backend_dev_memory", None, p, ctypes.POINTER(size), ctypes.POINTER(size)
        ),
        "reg_count": _declare(lib, "ggml_backend_reg_dev_count", size, p),
        "reg_get": _declare(lib, "ggml_backend_reg_dev_get", p, p, size),
    }


class _InitParams(ctypes.Structure):  # struct ggml_init_params (ggml.h)
    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


@cache
def _tensors():
    lib = _open("ggml-base")
    if lib is None:  # pragma: no cover
        raise RuntimeFailure("llama-cpp-python's libggml-base was not found")
    p = ctypes.c_void_p
    return {
        "init": _declare(lib, "ggml_init", p, _InitParams),
        "new_1d": _declare(lib, "ggml_new_tensor_1d", p, p, ctypes.c_int, ctypes.c_int64),
        "free": _declare(lib, "ggml_free", None, p),
        "supports_op": _declare(_open("ggml"), "ggml_backend_dev_supports_op", ctypes.c_bool, p, p),
    }


GGML_TYPE_F16 = 1


def holds_tensor(device: Device, n_elements: int, ggml_type: int = GGML_TYPE_F16) -> bool:
    """Whether the device can compute with one tensor of this many elements. llama.cpp
    places a context's KV cache on the devices its layers sit on without asking, and
    aborts the process when one layer's cache is larger than the device's largest
    buffer (Vulkan: maxStorageBufferRange, 128 MiB on lavapipe); the device's own
    supports_op answers for a tensor of that size, allocating nothing."""
    t = _tensors()
    ctx = t["init"](_InitParams(1 << 12, None, True))  # metadata only: no_alloc
    try:
        tensor = t["new_1d"](ctx, ggml_type, n_elements)
        return bool(t["supports_op"](device.handle, tensor))
    finally:
        t["free"](ctx)


@cache
def _rpc():
    lib = _open("ggml-rpc")
    if lib is None:
        return None
    p = ctypes.c_void_p
    size = ctypes.c_size_t
    return {
        "add_server": _declare(lib, "ggml_backend_rpc_add_server", p, ctypes.c_char_p),
        "start_server": _declare(
            lib,
            "ggml_backend_rpc_start_server",
            None,
            ctypes.c_char_p,
            ctypes.c_char_p,
            size,
            size,
            ctypes.POINTER(p),
        ),
    }


@cache
def _set_abort_callback():
    lib = _open("ggml-base")
    if lib is None:  # pragma: no cover
        raise RuntimeFailure("llama-cpp-python's libggml-base was not found")
    return _declare(lib, "ggml_set_abort_callback", ctypes.c_void_p, ABORT_CALLBACK)


def set_abort_callback(callback) -> None:
    """Has ggml call `callback(message)` before it aborts the process (see rpc_faults)."""
    _set_abort_callback()(callback)


@dataclass(frozen=True)
class Device:
    """One ggml device: a local CPU or GPU, or one device of an RPC worker."""

    handle: int
    name: str
    description: str
    kind: int

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes; for an RPC device, asked of the worker."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        _ggml()["memory"](self.handle, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value


def _device(handle: int) -> Device:
    g = _ggml()
    return Device(
        handle,
        g["name"](handle).decode("utf-8", errors="replace"),
        g["description"](handle).decode("utf-8", errors="replace"),
        int(g["type"](handle)),
    )


def local_devices() -> list[Device]:
    """This machine's devices as registered in ggml (the CPU, GPUs, accelerators)."""
    llama_log.take_over()
    llama_cpp.llama_backend_init()
    g = _ggml()
    return [_device(g["get"](i)) for i in range(g["count"]())]


@cache
def offload_devices() -> tuple[Device, ...]:
    """The local devices llama.cpp offloads layers to by default: the GPUs, else the
    integrated GPUs (its own rule in llama_model_load_from_file)."""
    devices = local_devices()
    gpus = tuple(d for d in devices if d.kind == GPU)
    return gpus or tuple(d for d in devices if d.kind == IGPU)


def has_rpc() -> bool:
    """Whether the installed llama.cpp was built with its RPC backend (GGML_RPC=ON)."""
    return _rpc() is not None


def rpc_devices(endpoint: str) -> list[Device]:
    """The devices a worker serves, registered with ggml (connects once to count them;
    ggml keeps the registration for the life of the process). Call it only for a worker
    that answered rpc_endpoints.check_worker: ggml aborts the process otherwise."""
    rpc = _rpc()
    if rpc is None:
        raise RuntimeFailure(
            "this llama-cpp-python was built without llama.cpp's RPC backend; "
            "reinstall dera-local as the README says (scripts/llama-wheel adds GGML_RPC=ON)"
        )
    reg = rpc["add_server"](endpoint.encode())
    if not reg:
        raise RuntimeFailure(f"the RPC worker at {endpoint} serves no devices")
    g = _ggml()
    return [_device(g["reg_get"](reg, i)) for i in range(g["reg_count"](reg))]


def start_rpc_server(
    endpoint: str, cache_dir: str | None, n_threads: int, devices: list[Device]
) -> None:
    """Runs llama.cpp's RPC server on `endpoint`; returns only if it fails to start."""
    rpc = _rpc()
    if rpc is None:
        raise RuntimeFailure(
            "this llama-cpp-python was built without llama.cpp's RPC backend (GGML_RPC=ON)"
        )
    handles = (ctypes.c_void_p * len(devices))(*(d.handle for d in devices))
    cache_arg = cache_dir.encode() if cache_dir else None
    rpc["start_server"](endpoint.encode(), cache_arg, n_threads, len(devices), handles)
