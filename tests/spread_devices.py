"""A model spread over two devices on a CPU-only machine, with CUDA's device-mismatch errors.

Why not torch's ``FakeTensorMode`` with fake ``cuda:0``/``cuda:1``: on a CPU-only build (torch
2.13 here) a tensor that requires grad on a fake CUDA device aborts the process in autograd's
``InputMetadata`` (no CUDA device guard is linked), and fake tensors carry no data, so the
``.tolist()``/``bool()`` an edit step needs cannot run either. Instead the two "GPUs" are
``meta:0`` and ``meta:1`` (meta is the device type with a guard on a CPU build): their tensors are
:class:`OnDevice` wrappers that report that device while holding real CPU data, and
:class:`DevicesMode` runs every op on the data after CUDA's check that all tensor arguments share one
device (CPU scalars may mix in, and CPU index tensors may index, as on CUDA). Factories and ``.to()``
honour ``device=meta:k``; the host CPU stays a third, distinct device. So code that builds an index
on the input device and uses it on a later layer's tensor fails here exactly as on two GPUs, while
correct code runs and computes real numbers. Modules are spread with accelerate's own
``AlignDevicesHook``, as ``from_pretrained(device_map=...)`` does.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

GPUS = (torch.device("meta", 0), torch.device("meta", 1))
_INDEXING = ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default", "aten._index_put_impl_.default")


class OnDevice(torch.Tensor):
    """A CPU tensor that reports one of :data:`GPUS` as its device (only usable under :class:`DevicesMode`)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device) -> "OnDevice":
        wrapped = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                      storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                      device=device, requires_grad=elem.requires_grad)
        wrapped.elem = elem
        return wrapped

    __torch_function__ = torch._C._disabled_torch_function_impl

    def tolist(self) -> Any:
        return self.elem.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("tensors on the fake GPUs need DevicesMode active")


class DevicesMode(TorchDispatchMode):
    """Run every op on CPU data after CUDA's same-device check."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices: set[torch.device] = set()
        indexing = str(func) in _INDEXING
        self_arg = args[0] if args else None

        def unwrap(x: Any) -> Any:
            if isinstance(x, OnDevice):
                devices.add(x.device)
                return x.elem
            if isinstance(x, torch.Tensor):
                if x.device.type == "meta":  # a data-less tensor created outside dispatch (``torch.tensor([], ...)``)
                    if x.numel():
                        raise RuntimeError(f"{func}: a real {x.device} tensor with data; the harness cannot run it")
                    devices.add(x.device)
                    return torch.empty(x.shape, dtype=x.dtype)
                if x.dim() > 0 and not (indexing and x is not self_arg):
                    devices.add(x.device)
            return x

        args, kwargs = tree_map(unwrap, args), tree_map(unwrap, dict(kwargs or {}))
        if kwargs.get("device") is not None:
            devices = {torch.device(kwargs["device"])}
            if devices <= set(GPUS):
                kwargs["device"] = torch.device("cpu")
        if len(devices) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{' and '.join(sorted(map(str, devices)))}! ({func})")
        out = func(*args, **kwargs)
        device = next(iter(devices)) if devices else None
        if device in GPUS:
            return tree_map(lambda x: OnDevice(x, device) if isinstance(x, torch.Tensor)
                            and not isinstance(x, OnDevice) else x, out)
        return out


class _DataOnDevice(TorchFunctionMode):
    """Tensors built from Python data outside dispatch: ``torch.tensor(data, device=meta:k)`` is built on
    CPU and wrapped; list indices (``x[0, [1, 2]]``, turned into data-less meta tensors otherwise) become
    CPU index tensors, which CUDA accepts as indices too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device) in GPUS:
            kwargs["device"] = torch.device("cpu")
            return OnDevice(func(*args, **kwargs), torch.device(device))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], OnDevice):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            index = tuple(torch.tensor(i) if isinstance(i, list) else i for i in index)
            args = (args[0], index, *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_gpus() -> Iterator[None]:
    """Both modes: ops checked and run (:class:`DevicesMode`), tensors built from data on either fake GPU."""
    with DevicesMode(), _DataOnDevice():
        yield


def spread(model: nn.Module, on_second: list[str]) -> nn.Module:
    """Put the submodules named in ``on_second`` on ``meta:1`` and the rest on ``meta:0``, with accelerate's hooks.

    Call inside :func:`fake_gpus`. Each decoder block and each other child of the model gets an
    ``AlignDevicesHook`` moving its inputs to its device, and the root model returns outputs on the
    input device, as with a ``device_map``; ``model.hf_device_map`` is set as ``from_pretrained`` sets it.
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    units = {}
    for name, module in model.named_children():
        for child_name, child in module.named_children() if name in ("model", "transformer") else [("", module)]:
            full = f"{name}.{child_name}" if child_name else name
            if isinstance(child, nn.ModuleList):
                units.update({f"{full}.{i}": block for i, block in enumerate(child)})
            else:
                units[full] = child
    device_map = {full: GPUS[1] if any(full == s or full.startswith(s + ".") for s in on_second) else GPUS[0]
                  for full in units}
    for full, module in units.items():
        device = device_map[full]
        module._apply(lambda t: t if isinstance(t, OnDevice) else OnDevice(t, device))
        add_hook_to_module(module, AlignDevicesHook(execution_device=device))
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True), append=True)
    model.hf_device_map = {full: str(device) for full, device in device_map.items()}
    return model
