"""A model spread over two devices on a CPU-only machine, with CUDA's device-mismatch errors.

Why not torch's ``FakeTensorMode`` with fake ``cuda:0``/``cuda:1``: on a CPU-only build (torch
2.13 here) a tensor that requires grad on a fake CUDA device aborts the process in autograd's
``InputMetadata`` (no CUDA device guard is linked), and fake tensors carry no data, so the
``.tolist()``/``bool()`` an edit step needs cannot run either. Instead the second device's tensors
are :class:`OnSecondDevice` wrappers that report ``device == SECOND`` (``meta``, the one other device
type with a guard on a CPU build) while holding real CPU data, and :class:`TwoDeviceMode` runs every
op on the data after checking, as CUDA does, that all non-scalar tensor arguments share one device.
Factories and ``.to()`` honour a ``device=SECOND`` argument. So code that builds an index on the
input device and uses it on a later layer's tensor fails here exactly as on two GPUs, while
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

SECOND = torch.device("meta")
FIRST = torch.device("cpu")


class OnSecondDevice(torch.Tensor):
    """A CPU tensor that reports :data:`SECOND` as its device (only usable under :class:`TwoDeviceMode`)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "OnSecondDevice":
        wrapped = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                      device=SECOND, requires_grad=elem.requires_grad)
        wrapped.elem = elem
        return wrapped

    __torch_function__ = torch._C._disabled_torch_function_impl

    def tolist(self) -> Any:
        return self.elem.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("tensors on the second device need TwoDeviceMode active")


class TwoDeviceMode(TorchDispatchMode):
    """Run every op on CPU data after CUDA's same-device check (CPU scalars may mix, as on CUDA)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices: set[torch.device] = set()

        def unwrap(x: Any) -> Any:
            if isinstance(x, OnSecondDevice):
                devices.add(SECOND)
                return x.elem
            if isinstance(x, torch.Tensor):
                if x.device == SECOND:  # a data-less tensor created outside dispatch (``torch.tensor([], ...)``)
                    if x.numel():
                        raise RuntimeError(f"{func}: a real {SECOND} tensor with data; the harness cannot run it")
                    devices.add(SECOND)
                    return torch.empty(x.shape, dtype=x.dtype)
                if x.dim() > 0:
                    devices.add(x.device)
            return x

        args, kwargs = tree_map(unwrap, args), tree_map(unwrap, dict(kwargs or {}))
        if kwargs.get("device") is not None:
            devices = {torch.device(kwargs["device"])}
            if devices == {SECOND}:
                kwargs["device"] = FIRST
        if len(devices) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{' and '.join(sorted(map(str, devices)))}! ({func})")
        out = func(*args, **kwargs)
        if devices == {SECOND}:
            return tree_map(lambda x: OnSecondDevice(x) if isinstance(x, torch.Tensor)
                            and not isinstance(x, OnSecondDevice) else x, out)
        return out


class _DataOnSecondDevice(TorchFunctionMode):
    """``torch.tensor(data, device=SECOND)`` builds its tensor outside dispatch: build it on CPU and wrap it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]) == SECOND:
            kwargs["device"] = FIRST
            return OnSecondDevice(func(*args, **kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def two_devices() -> Iterator[None]:
    """Both modes: ops checked and run (:class:`TwoDeviceMode`), tensors built from data on either device."""
    with TwoDeviceMode(), _DataOnSecondDevice():
        yield


def spread(model: nn.Module, second: list[str]) -> nn.Module:
    """Put the submodules named in ``second`` on :data:`SECOND`, the rest on CPU, with accelerate's hooks.

    Call inside :func:`two_devices`. Each top-level entry gets an ``AlignDevicesHook`` moving its
    inputs to its device, and the root model returns outputs on the input device, as with a
    ``device_map``. ``model.hf_device_map`` is set the way ``from_pretrained`` sets it.
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for name in second:
        model.get_submodule(name)._apply(lambda t: OnSecondDevice(t) if not isinstance(t, OnSecondDevice) else t)
    device_map = {}
    for name, module in model.named_children():
        for child_name, child in module.named_children() if name == "model" else [("", module)]:
            full = f"{name}.{child_name}" if child_name else name
            if isinstance(child, nn.ModuleList):
                for i, block in enumerate(child):
                    device_map[f"{full}.{i}"] = block
            else:
                device_map[full] = child
    for full, module in device_map.items():
        on_second = any(full == s or full.startswith(s + ".") for s in second)
        add_hook_to_module(module, AlignDevicesHook(execution_device=SECOND if on_second else FIRST))
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True), append=True)
    model.hf_device_map = {full: ("meta" if any(full == s or full.startswith(s + ".") for s in second) else "cpu")
                           for full in device_map}
    return model
