"""Target values ``z`` (MEMIT ``compute_z``) for all requests of a batch at once.

For request ``i`` a free vector ``delta_i`` is added to the output of the last edited block at the
subject's last token of its rewriting prompts (every context template + target tokens but the
last) and of its KL prompt (``"{subject} is a"``). Loss per request = mean over rewriting prompts
of the target tokens' mean NLL (read at block ``v_loss_layer``, final norm and unembedding applied
only at the target positions) + ``kl_factor * KL(P_now || P_start)`` at the KL prompt's subject
token + ``v_weight_decay * ||delta|| / ||z_init||^2``. Adam is elementwise, so optimising the rows of
``delta`` together is exact; early stop (loss < 5e-2) and the norm clamp are applied per row.

Speed (spec 6.4): nothing below the last edited block depends on ``delta``, so its output is
computed once. With ``z_prefix_cache`` the tokens before each subject's last token are not
recomputed either: their keys/values come from a cache of that first forward and every step
runs only the suffix tokens (exact, a few times fewer tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from .modules import (base_model, block_hidden, cache_checkpoint, logits_from_hidden, replace_block_hidden,
                      sliding_window, stop_after)
from .templates import KL_PROMPT_SUFFIX, EditRequest, TokenView, split_template

#: MEMIT's early-stop threshold on a request's total loss.
EARLY_STOP_LOSS = 5e-2


@dataclasses.dataclass
class ZBatch:
    """Every prompt of every request, right-padded, with where ``delta`` goes and where the targets are."""

    ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T]
    lengths: torch.Tensor  # [B]
    subject_last: torch.Tensor  # [B]
    request_of_row: torch.Tensor  # [B]
    target_rows: torch.Tensor  # [P] row of each target token
    target_cols: torch.Tensor  # [P] position whose logits predict it
    target_ids: torch.Tensor  # [P]
    target_prompt: torch.Tensor  # [P] index of its rewriting prompt
    prompt_request: torch.Tensor  # [R] request of each rewriting prompt
    prompt_len: torch.Tensor  # [R] number of target tokens
    kl_rows: torch.Tensor  # [n]
    init_rows: torch.Tensor  # [n] the bare rewriting prompt of each request


def build_z_batch(view: TokenView, requests: Sequence[EditRequest], groups: Sequence[Sequence[str]],
                  device: torch.device) -> ZBatch:
    """Rewriting prompts (request-major, template order) followed by one KL prompt per request."""
    seqs, last, req_of_row = [], [], []
    t_rows, t_cols, t_ids, t_prompt, p_req, p_len, init_rows = [], [], [], [], [], [], []
    for i, request in enumerate(requests):
        target = view.encode_target(request.target_new)
        init_rows.append(len(seqs))
        for group in groups:
            for template in group:
                before, after = split_template(template)
                prompt_ids = view.encode(before + request.prompt + after)
                row = len(seqs)
                seqs.append(prompt_ids + target[:-1])
                last.append(view.subject_last_index(before + request.before + request.subject))
                req_of_row.append(i)
                for j, token in enumerate(target):
                    t_rows.append(row)
                    t_cols.append(len(prompt_ids) - 1 + j)
                    t_ids.append(token)
                    t_prompt.append(len(p_req))
                p_req.append(i)
                p_len.append(len(target))
    kl_rows = []
    for i, request in enumerate(requests):
        kl_rows.append(len(seqs))
        seqs.append(view.encode(request.subject + KL_PROMPT_SUFFIX))
        last.append(view.subject_last_index(request.subject))
        req_of_row.append(i)
    ids, mask = view.right_pad(seqs, device)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return ZBatch(ids, mask, mask.sum(1), tensor(last), tensor(req_of_row), tensor(t_rows), tensor(t_cols),
                  tensor(t_ids), tensor(t_prompt), tensor(p_req), tensor(p_len), tensor(kl_rows), tensor(init_rows))


class _Runner:
    """Runs the layers above the z block for a given ``delta`` and returns loss-block rows.

    Full mode re-runs whole prompts, replacing the z block's output with the cached one plus
    ``delta``. Prefix mode feeds only tokens from each subject's last token on, attending to the
    cached keys/values of the earlier tokens through an explicit 4-D mask.
    """

    def __init__(self, model: nn.Module, batch: ZBatch, z_block: nn.Module, loss_block: nn.Module,
                 prefix_cache: bool) -> None:
        self.model, self.batch, self.z_block, self.loss_block = model, batch, z_block, loss_block
        self.prefix_cache = prefix_cache
        captured: dict[str, Any] = {}

        def grab(_mod: nn.Module, _args: tuple, output: Any) -> None:
            captured["z"] = block_hidden(output).detach()

        handle = z_block.register_forward_hook(grab)
        try:
            with torch.no_grad():
                if prefix_cache:
                    out = base_model(model)(input_ids=batch.ids, attention_mask=batch.mask, use_cache=True)
                    self.cache = out.past_key_values
                else:
                    with stop_after(z_block):
                        model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        finally:
            handle.remove()
        self.z_out = captured["z"]  # [B, T, d]
        rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)
        self.z_init_rows = self.z_out[rows, batch.subject_last]  # [B, d]
        if prefix_cache:
            self._prepare_suffix()

    def _prepare_suffix(self) -> None:
        b = self.batch
        device = b.ids.device
        n_rows, width = b.ids.shape
        suffix_len = b.lengths - b.subject_last
        s_max = int(suffix_len.max())
        offs = torch.arange(s_max, device=device)
        pos = b.subject_last[:, None] + offs[None, :]
        inside = offs[None, :] < suffix_len[:, None]
        pos_clamped = torch.where(inside, pos, b.subject_last[:, None])
        rows = torch.arange(n_rows, device=device)[:, None]
        self.suffix_ids = torch.where(inside, b.ids[rows, pos_clamped], torch.zeros_like(pos))
        self.suffix_pos = pos_clamped
        self.suffix_base = self.z_out[rows, pos_clamped]  # [B, S, d]
        dtype = self.z_out.dtype
        blocked = torch.finfo(dtype).min
        cached_ok = torch.arange(width, device=device)[None, None, :] < b.subject_last[:, None, None]
        causal = offs[None, :, None] >= offs[None, None, :]
        new_ok = causal & inside[:, None, :]
        new_ok = new_ok | (offs[None, None, :] == 0)
        allowed = torch.cat([cached_ok.expand(n_rows, s_max, width), new_ok.expand(n_rows, s_max, s_max)], dim=-1)
        self.mask4d = torch.where(allowed, torch.zeros((), dtype=dtype, device=device),
                                  torch.full((), blocked, dtype=dtype, device=device))[:, None]

    def loss_rows(self, delta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Loss-block output at ``(rows, cols)`` (absolute positions) with ``delta`` injected."""
        b = self.batch
        captured: dict[str, torch.Tensor] = {}
        shift = delta[b.request_of_row].to(self.z_out.dtype)

        def inject(_mod: nn.Module, _args: tuple, output: Any) -> Any:
            if self.prefix_cache:
                hidden = self.suffix_base.clone()
                hidden[:, 0] = hidden[:, 0] + shift
            else:
                hidden = self.z_out.clone()
                all_rows = torch.arange(hidden.shape[0], device=hidden.device)
                hidden[all_rows, b.subject_last] = hidden[all_rows, b.subject_last] + shift
            return replace_block_hidden(output, hidden)

        def grab(_mod: nn.Module, _args: tuple, output: Any) -> None:
            captured["h"] = block_hidden(output)

        handles = [self.z_block.register_forward_hook(inject), self.loss_block.register_forward_hook(grab)]
        try:
            if self.prefix_cache:
                with cache_checkpoint(self.cache), stop_after(self.loss_block):
                    self.model(input_ids=self.suffix_ids, attention_mask=self.mask4d, position_ids=self.suffix_pos,
                               past_key_values=self.cache, use_cache=True)
            else:
                with stop_after(self.loss_block):
                    self.model(input_ids=b.ids, attention_mask=b.mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if self.prefix_cache:
            cols = cols - b.subject_last[rows]
        return captured["h"][rows, cols]


def compute_target_values(model: nn.Module, view: TokenView, requests: Sequence[EditRequest],
                          groups: Sequence[Sequence[str]], z_block: nn.Module, loss_block: nn.Module,
                          ln_f: nn.Module, lm_head: nn.Module, softcap: float | None, hp: Any,
                          device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(Z [d, n] float32, info)``: ``z_i = z_init_i + delta_i`` after at most ``v_num_grad_steps`` Adam steps.

    ``info`` reports per-request final losses and the number of steps each request took.
    """
    batch = build_z_batch(view, requests, groups, device)
    window = sliding_window(model)
    fits = window is None or 2 * batch.ids.shape[1] < window
    runner = _Runner(model, batch, z_block, loss_block, hp.z_prefix_cache and fits)
    n = len(requests)
    z_init = runner.z_init_rows[batch.init_rows].float()  # [n, d]
    max_norm = hp.clamp_norm_factor * z_init.norm(dim=1)  # [n]
    delta = torch.zeros_like(z_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_cols = batch.subject_last[batch.kl_rows]
    rows = torch.cat([batch.target_rows, batch.kl_rows])
    cols = torch.cat([batch.target_cols, kl_cols])
    n_targets = batch.target_rows.numel()
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps_taken = torch.zeros(n, dtype=torch.long, device=device)
    kl_init = None
    losses = torch.zeros(n, device=device)
    for step in range(hp.v_num_grad_steps):
        hidden = runner.loss_rows(delta, rows, cols)
        log_probs = torch.log_softmax(logits_from_hidden(hidden, ln_f, lm_head, softcap), dim=-1)
        token_lp = log_probs[:n_targets].gather(1, batch.target_ids[:, None]).squeeze(1)
        prompt_nll = -torch.zeros(batch.prompt_len.numel(), device=device).index_add(0, batch.target_prompt, token_lp)
        prompt_nll = prompt_nll / batch.prompt_len
        per_request = torch.zeros(n, device=device).index_add(0, batch.prompt_request, prompt_nll)
        nll = per_request / torch.bincount(batch.prompt_request, minlength=n)
        kl_lp = log_probs[n_targets:]
        if kl_init is None:
            kl_init = kl_lp.detach()
        kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
        decay = hp.v_weight_decay * delta.norm(dim=1) / z_init.norm(dim=1) ** 2
        loss = nll + hp.kl_factor * kl + decay
        losses = loss.detach()
        active = active & (losses >= EARLY_STOP_LOSS)
        if not bool(active.any()) or step == hp.v_num_grad_steps - 1:
            break
        optimizer.zero_grad()
        (loss * active).sum().backward()
        frozen = delta.detach().clone()
        optimizer.step()
        with torch.no_grad():
            delta[~active] = frozen[~active]
            norms = delta.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
        steps_taken += active.long()
    z = (z_init + delta.detach()).T.contiguous()
    return z, {"z_loss": losses.tolist(), "z_steps": steps_taken.tolist()}
