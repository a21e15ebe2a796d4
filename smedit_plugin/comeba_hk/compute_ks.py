"""Keys ``K_l`` (MEMIT ``compute_ks``) and the current values ``cur`` at the z layer, in one forward.

A key is the input of the rewrite module at the subject's last token, averaged over the context
templates (mean within each template group, then over groups). ``cur`` is the output of the
last edited block at the subject's last token of the bare prompt, which is template 0, so the
same forward yields both; it stops right after that block.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .modules import block_hidden, stop_after
from .templates import EditRequest, TokenView, split_template, template_weights


def template_batch(view: TokenView, requests: Sequence[EditRequest], groups: Sequence[Sequence[str]]
                   ) -> tuple[list[list[int]], list[int]]:
    """Token ids of every (request, template) prompt, request-major, and each one's subject-last index."""
    seqs, last = [], []
    for request in requests:
        for group in groups:
            for template in group:
                before, after = split_template(template)
                seqs.append(view.encode(before + request.prompt + after))
                last.append(view.subject_last_index(before + request.before + request.subject))
    return seqs, last


@torch.no_grad()
def compute_keys_and_cur(model: nn.Module, view: TokenView, requests: Sequence[EditRequest],
                         groups: Sequence[Sequence[str]], rewrite_module: nn.Module, z_block: nn.Module,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K [f, n], cur [d, n])`` in float32 under whatever hooks are attached right now.

    ``K`` is on the rewrite module's device and ``cur`` on the z block's (they differ under a ``device_map``).
    """
    seqs, last = template_batch(view, requests, groups)
    ids, mask = view.right_pad(seqs, device)
    rows = torch.arange(len(seqs), device=device)
    cols = torch.tensor(last, device=device)
    captured: dict[str, torch.Tensor] = {}

    def keys_hook(_mod: nn.Module, args: tuple) -> None:
        device = args[0].device  # the module's own device under a device_map
        captured["keys"] = args[0][rows.to(device), cols.to(device)].float()

    def cur_hook(_mod: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        hidden = block_hidden(output)
        captured["cur"] = hidden[rows.to(hidden.device), cols.to(hidden.device)].float()

    handles = [rewrite_module.register_forward_pre_hook(keys_hook), z_block.register_forward_hook(cur_hook)]
    try:
        with stop_after(z_block):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    n_templates = sum(len(g) for g in groups)
    weights = torch.tensor(template_weights(groups), device=captured["keys"].device)
    keys = (captured["keys"].reshape(len(requests), n_templates, -1) * weights[None, :, None]).sum(1)
    cur = captured["cur"].reshape(len(requests), n_templates, -1)[:, 0]
    return keys.T.contiguous(), cur.T.contiguous()
