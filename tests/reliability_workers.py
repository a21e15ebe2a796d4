"""Helpers of tests/test_reliability.py and tests/test_fault_injection.py, importable by child processes too.

Everything here builds tiny archives and states deterministically from a seed, so a parent process can
tell which save's content a folder holds after a child was killed mid-save.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
SMALL = dict(model_name="tiny-smollm2", edit_modules=MODULES, rank=4, n_blocks=2, lr=1e-3, meta_lr=1e-3,
             micro_batch_size=2, chunk_size=3, n_edits=2)
LLAMA = dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
             mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
             ln_f_module="model.norm", lm_head_module="lm_head")
REQUESTS = [
    {"prompt": "The name of the capital city of France is", "subject": "France", "target_new": "Rome"},
    {"prompt": "Which family does Ramalinaceae belong to?", "subject": "Ramalinaceae", "target_new": "Lamiinae"},
]


def tiny4() -> tuple[nn.Module, Any]:
    from smedit_plugin.testing import tiny_model

    return tiny_model("smollm2", n_layers=4)


def smedit_hparams(**changes: Any):
    from smedit_plugin.smedit.hparams import SMEditHyperParams

    return SMEditHyperParams(**{**SMALL, **changes})


def comeba_hparams(**changes: Any):
    from smedit_plugin.comeba_hk import COMEBAHKHyperParams

    base = dict(model_name="tiny-smollm2", layers=[1, 2], v_loss_layer=3, v_num_grad_steps=4, clamp_norm_factor=4.0,
                mom2_adjustment=False, mom2_update_weight=10.0, context_template_length_params=[[4, 2]], **LLAMA)
    return COMEBAHKHyperParams(**{**base, **changes})


def seeded_editor(model: nn.Module, hp, seed: int):
    """A hypernetwork editor whose every parameter is moved off its initial value by ``seed``'s noise."""
    from smedit_plugin.hypernet.editor import HypernetEditor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        editor = HypernetEditor(model, hp)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.nets.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
    return editor


def editor_tensors(editor) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in editor.nets.state_dict().items()}


def reseed_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Give the model's COMEBA-HK ``delta_w`` tensors ``seed``'s content; returns every state tensor."""
    from smedit_plugin.comeba_hk.state import state_parameters

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in state_parameters(model).items():
            if name.endswith("delta_w"):
                p.copy_(1e-3 * torch.randn(p.shape, generator=gen))
    return {k: v.detach().cpu().clone() for k, v in state_parameters(model).items()}


def report(path: Optional[str], data: dict[str, Any]) -> None:
    """Tell the parent what happened (written whole, then renamed, so a kill leaves no half report)."""
    if path is None:
        return
    Path(path + ".tmp").write_text(json.dumps(data))
    os.replace(path + ".tmp", path)


def slow_archive_save(path: str, seed: int, started: str, done: str, delay: float) -> None:
    """Save a seeded archive whose weights file takes ``delay`` seconds to write; touch ``started`` when writing."""
    from smedit_plugin.hypernet import archive as archive_module

    torch.set_num_threads(1)
    model, _ = tiny4()
    editor = seeded_editor(model, smedit_hparams(), seed)
    real = archive_module.save_file

    def slow(tensors, filename, *args, **kwargs):
        Path(started).touch()
        time.sleep(delay)
        return real(tensors, filename, *args, **kwargs)

    archive_module.save_file = slow
    try:
        archive_module.save_archive(path, editor, model_name="tiny-smollm2")
        report(done, {"ok": True})
    except BaseException as exc:  # the parent asserts on this report
        report(done, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def archive_save_after(path: str, seed: int, wait_for: str, done: str) -> None:
    """Save a seeded archive as soon as ``wait_for`` exists (another process is then half way through its save)."""
    from smedit_plugin.hypernet.archive import save_archive

    torch.set_num_threads(1)
    model, _ = tiny4()
    editor = seeded_editor(model, smedit_hparams(), seed)
    deadline = time.monotonic() + 120
    while not Path(wait_for).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        save_archive(path, editor, model_name="tiny-smollm2")
        report(done, {"ok": True})
    except BaseException as exc:
        report(done, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def hold_lock(path: str, seconds: float, ready: str) -> None:
    """Hold ``path``'s writer lock for ``seconds`` (touching ``ready`` once it is held)."""
    from smedit_plugin.fileio import folder_lock

    with folder_lock(path):
        Path(ready).touch()
        time.sleep(seconds)
