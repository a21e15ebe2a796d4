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
import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..tfcompat import cache_keyword, returned_cache
from .modules import (CacheState, base_model, block_hidden, cache_checkpoint, cache_state, logits_from_hidden,
                      replace_block_hidden, restore_cache_state, select_cache_rows, sliding_window, stop_after)
from .templates import KL_PROMPT_SUFFIX, EditRequest, TokenView, split_template

logger = logging.getLogger(__name__)

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


#: Most groups the rewriting prompts are split into for a suffix pass (by suffix length: less padding).
SUFFIX_BUCKETS = 3


def _first_pass(model: nn.Module, batch: ZBatch, z_block: nn.Module, with_cache: bool) -> tuple[torch.Tensor, Any]:
    """The z block's output for every prompt (delta = 0) and, if asked, the KV cache of all layers."""
    captured: dict[str, torch.Tensor] = {}

    def grab(_mod: nn.Module, _args: tuple, output: Any) -> None:
        captured["z"] = block_hidden(output).detach()

    handle = z_block.register_forward_hook(grab)
    try:
        with torch.no_grad():
            if with_cache:
                decoder = base_model(model)
                cache = returned_cache(decoder, decoder(input_ids=batch.ids, attention_mask=batch.mask, use_cache=True))
            else:
                cache = None
                with stop_after(z_block):
                    model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    finally:
        handle.remove()
    return captured["z"], cache


class _FullRunner:
    """Re-runs whole prompts each step, the z block's output replaced by the cached one plus ``delta``.

    The fallback for attention kernels that take no explicit 4-D mask (flash attention).
    """

    def __init__(self, model: nn.Module, batch: ZBatch, z_block: nn.Module, loss_block: nn.Module) -> None:
        self.model, self.batch, self.z_block, self.loss_block = model, batch, z_block, loss_block
        self.z_out, _ = _first_pass(model, batch, z_block, with_cache=False)

    def loss_rows(self, delta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Loss-block output at ``(rows, cols)`` with ``delta`` added at every subject's last token."""
        b = self.batch
        captured: dict[str, torch.Tensor] = {}
        z_device = self.z_out.device
        shift = delta[b.request_of_row.to(delta.device)].to(device=z_device, dtype=self.z_out.dtype)
        every = torch.arange(b.ids.shape[0], device=z_device)
        subject_last = b.subject_last.to(z_device)

        def inject(_mod: nn.Module, _args: tuple, output: Any) -> Any:
            hidden = self.z_out.clone()
            hidden[every, subject_last] = hidden[every, subject_last] + shift
            return replace_block_hidden(output, hidden)

        def grab(_mod: nn.Module, _args: tuple, output: Any) -> None:
            captured["h"] = block_hidden(output)

        handles = [self.z_block.register_forward_hook(inject), self.loss_block.register_forward_hook(grab)]
        try:
            with stop_after(self.loss_block):
                self.model(input_ids=b.ids, attention_mask=b.mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        hidden = captured["h"]
        return hidden[rows.to(hidden.device), cols.to(hidden.device)]


@dataclasses.dataclass
class _Bucket:
    """Prompts run together in the suffix pass, padded to ``width`` suffix tokens."""

    rows: torch.Tensor
    requests: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    base: torch.Tensor
    cache: CacheState  # the KV cache cut to ``rows``, selected once instead of at every step
    replay: Optional[list[tuple[tuple, dict]]] = None


def _split_by_width(widths: list[int], counts: list[int], max_groups: int) -> list[list[int]]:
    """Indices (sorted by width) cut into at most ``max_groups`` runs with the fewest padded tokens.

    A run's cost is its prompt count times its widest member (the last, once sorted), read off
    prefix sums, so trying every one or two cuts is O(n^2) rather than O(n^3).
    """
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    n = len(order)
    prefix = [0]
    for i in order:
        prefix.append(prefix[-1] + counts[i])

    def cost(lo: int, hi: int) -> int:
        return (prefix[hi] - prefix[lo]) * widths[order[hi - 1]]

    best: tuple[float, tuple[int, ...]] = (cost(0, n), ())
    for a in range(1, n if max_groups >= 2 else 1):
        if cost(0, a) + cost(a, n) < best[0]:
            best = (cost(0, a) + cost(a, n), (a,))
    for a in range(1, n if max_groups >= 3 else 1):
        for b in range(a + 1, n):
            total = cost(0, a) + cost(a, b) + cost(b, n)
            if total < best[0]:
                best = (total, (a, b))
    bounds = [0, *best[1], n]
    return [order[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


class _PrefixRunner:
    """Runs only the tokens from each subject's last token on, attending to cached earlier tokens.

    Tokens before the subject's last token are unaffected by ``delta`` (causal attention), so their
    keys/values at every layer come from one cached forward; a step feeds the suffix tokens with an
    explicit 4-D mask (cached prefix + causal suffix) and their true positions. The blocks above the
    z block are called directly after the first pass of each bucket (their arguments captured
    then), so the layers below, whose output is replaced anyway, are skipped. KL prompts need only
    the subject's last token; requests whose loss stopped are left out bucket by bucket.
    """

    def __init__(self, model: nn.Module, batch: ZBatch, z_block: nn.Module, upper_blocks: list[nn.Module]) -> None:
        self.model, self.batch, self.z_block, self.upper_blocks = model, batch, z_block, upper_blocks
        self.z_out, self.cache = _first_pass(model, batch, z_block, with_cache=True)
        device = batch.ids.device
        suffix = (batch.lengths - batch.subject_last).tolist()
        kl_rows = set(batch.kl_rows.tolist())
        n_requests = len(batch.init_rows)
        rows_of: list[list[int]] = [[] for _ in range(n_requests)]
        for row, request in enumerate(batch.request_of_row.tolist()):  # one pass over Python ints (issue 28)
            if row not in kl_rows:
                rows_of[request].append(row)
        widths = [max(suffix[r] for r in rows) for rows in rows_of]
        groups = _split_by_width(widths, [len(rows) for rows in rows_of], SUFFIX_BUCKETS)
        self.buckets = [self._bucket([r for i in g for r in rows_of[i]], g, max(widths[i] for i in g), device)
                        for g in groups]
        self.buckets.append(self._bucket(batch.kl_rows.tolist(), list(range(n_requests)), 1, device))
        self.width = max(widths + [1])
        restore_cache_state(self.buckets[0].cache)  # the whole batch's cache is not needed any more

    def _bucket(self, rows: list[int], requests: list[int], width: int, device: torch.device) -> _Bucket:
        b = self.batch
        row_t = torch.tensor(rows, dtype=torch.long, device=device)
        start = b.subject_last[row_t]
        length = torch.clamp(b.lengths[row_t] - start, max=width)
        offs = torch.arange(width, device=device)
        inside = offs[None, :] < length[:, None]
        positions = torch.where(inside, start[:, None] + offs[None, :], start[:, None])
        ids = torch.where(inside, b.ids[row_t[:, None], positions], torch.zeros_like(positions))
        dtype = self.z_out.dtype
        cached_ok = torch.arange(b.ids.shape[1], device=device)[None, None, :] < start[:, None, None]
        new_ok = (offs[None, :, None] >= offs[None, None, :]) & inside[:, None, :] | (offs[None, None, :] == 0)
        allowed = torch.cat([cached_ok.expand(len(rows), width, -1), new_ok.expand(len(rows), width, width)], dim=-1)
        mask = torch.where(allowed, torch.zeros((), dtype=dtype, device=device),
                           torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device))[:, None]
        z_device = self.z_out.device
        with cache_checkpoint(self.cache):
            select_cache_rows(self.cache, row_t)
            rows_cache = cache_state(self.cache)
        return _Bucket(row_t, torch.tensor(requests, dtype=torch.long, device=z_device), ids, positions, mask,
                       self.z_out[row_t.to(z_device)[:, None], positions.to(z_device)], rows_cache)

    def _run(self, bucket: _Bucket, shift: torch.Tensor) -> torch.Tensor:
        """Output of the last upper block for one bucket (first time through the model, then replayed)."""
        hidden = bucket.base.clone()
        hidden[:, 0] = hidden[:, 0] + shift
        with cache_checkpoint(self.cache):
            restore_cache_state(bucket.cache)
            if bucket.replay is not None:
                for block, (args, kwargs) in zip(self.upper_blocks, bucket.replay):
                    hidden = block_hidden(block(hidden, *args, **kwargs))
                return hidden
            return self._first_run(bucket, hidden)

    def _first_run(self, bucket: _Bucket, hidden: torch.Tensor) -> torch.Tensor:
        calls: list[tuple[tuple, dict]] = []
        captured: dict[str, torch.Tensor] = {}

        def record(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args[1:], dict(kwargs)))

        def inject(_mod: nn.Module, _args: tuple, output: Any) -> Any:
            return replace_block_hidden(output, hidden)

        def grab(_mod: nn.Module, _args: tuple, output: Any) -> None:
            captured["h"] = block_hidden(output)

        handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in self.upper_blocks]
        handles += [self.z_block.register_forward_hook(inject), self.upper_blocks[-1].register_forward_hook(grab)]
        try:
            with stop_after(self.upper_blocks[-1]):
                self.model(input_ids=bucket.ids, attention_mask=bucket.mask, position_ids=bucket.positions,
                           use_cache=True, **{cache_keyword(self.model): self.cache})
        finally:
            for handle in handles:
                handle.remove()
        bucket.replay = calls
        return captured["h"]

    def loss_rows(self, delta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Loss-block output at ``(rows, cols)`` (absolute positions); rows of inactive buckets are zeros."""
        b = self.batch
        out = torch.zeros(b.ids.shape[0], self.width, self.z_out.shape[-1], dtype=self.z_out.dtype,
                          device=self.z_out.device)
        for bucket in self.buckets:
            if not bool(active[bucket.requests].any()):
                continue
            shift = delta[b.request_of_row[bucket.rows].to(delta.device)].to(device=bucket.base.device,
                                                                                dtype=self.z_out.dtype)
            hidden = self._run(bucket, shift).to(out.device)
            width = hidden.shape[1]
            out = out.index_put((bucket.rows.to(out.device)[:, None].expand(-1, width),
                                 torch.arange(width, device=out.device)[None, :].expand(len(bucket.rows), -1)), hidden)
        rows, cols = rows.to(out.device), cols.to(out.device)
        return out[rows, cols - b.subject_last.to(out.device)[rows]]


def compute_target_values(model: nn.Module, view: TokenView, requests: Sequence[EditRequest],
                          groups: Sequence[Sequence[str]], z_block: nn.Module, upper_blocks: list[nn.Module],
                          ln_f: nn.Module, lm_head: nn.Module, softcap: Optional[float], hp: Any,
                          device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(Z [d, n] float32, info)``: ``z_i = z_init_i + delta_i`` after at most ``v_num_grad_steps`` Adam steps.

    ``upper_blocks`` are the blocks above the z block up to the loss block (``v_loss_layer``).
    ``info`` reports per-request final losses and the number of steps each request took.
    Requests are optimised ``hp.z_chunk_size`` at a time (0 = all at once): each request's loss,
    Adam state, early stop and clamp are its own, so chunks give the same ``Z`` while the
    activations held for the backward pass stop growing with the batch.
    """
    size = hp.z_chunk_size or len(requests)
    parts = [_chunk_target_values(model, view, requests[start:start + size], groups, z_block, upper_blocks, ln_f,
                                  lm_head, softcap, hp, device) for start in range(0, len(requests), size)]
    z = torch.cat([part for part, _ in parts], dim=1)
    return z, {key: [value for _, info in parts for value in info[key]] for key in ("z_loss", "z_steps")}


def _chunk_target_values(model: nn.Module, view: TokenView, requests: Sequence[EditRequest],
                         groups: Sequence[Sequence[str]], z_block: nn.Module, upper_blocks: list[nn.Module],
                         ln_f: nn.Module, lm_head: nn.Module, softcap: Optional[float], hp: Any,
                         device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`compute_target_values` for requests optimised together."""
    batch = build_z_batch(view, requests, groups, device)
    window = sliding_window(model)
    fits = window is None or 2 * batch.ids.shape[1] < window
    runner = (_PrefixRunner(model, batch, z_block, upper_blocks) if hp.z_prefix_cache and fits
              else _FullRunner(model, batch, z_block, upper_blocks[-1]))
    n = len(requests)
    z_device = runner.z_out.device  # delta and the per-request bookkeeping live with the z block (device_map)
    init_rows = batch.init_rows.to(z_device)
    z_init = runner.z_out[init_rows, batch.subject_last.to(z_device)[init_rows]].float()  # [n, d]
    max_norm = hp.clamp_norm_factor * z_init.norm(dim=1)  # [n]
    delta = torch.zeros_like(z_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_cols = batch.subject_last[batch.kl_rows]
    rows = torch.cat([batch.target_rows, batch.kl_rows])
    cols = torch.cat([batch.target_cols, kl_cols])
    n_targets = batch.target_rows.numel()
    active = torch.ones(n, dtype=torch.bool, device=z_device)
    steps_taken = torch.zeros(n, dtype=torch.long, device=z_device)
    kl_init = None
    losses = torch.zeros(n, device=z_device)
    targets = None
    for step in range(hp.v_num_grad_steps):
        hidden = runner.loss_rows(delta, rows, cols, active)
        log_probs = torch.log_softmax(logits_from_hidden(hidden, ln_f, lm_head, softcap), dim=-1)
        if targets is None:  # the index tensors, once, on the device the logits come out on
            targets = {key: getattr(batch, key).to(log_probs.device)
                       for key in ("target_ids", "target_prompt", "prompt_request", "prompt_len")}
        out_device = log_probs.device
        token_lp = log_probs[:n_targets].gather(1, targets["target_ids"][:, None]).squeeze(1)
        prompt_nll = -torch.zeros(batch.prompt_len.numel(), device=out_device).index_add(
            0, targets["target_prompt"], token_lp)
        prompt_nll = prompt_nll / targets["prompt_len"]
        per_request = torch.zeros(n, device=out_device).index_add(0, targets["prompt_request"], prompt_nll)
        nll = (per_request / torch.bincount(targets["prompt_request"], minlength=n)).to(z_device)
        kl_lp = log_probs[n_targets:]
        if kl_init is None:
            kl_init = kl_lp.detach()
        kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1).to(z_device)
        decay = hp.v_weight_decay * delta.norm(dim=1) / z_init.norm(dim=1) ** 2
        loss = nll + hp.kl_factor * kl + decay
        losses = torch.where(active, loss.detach(), losses)
        logger.debug("z step %d: loss %s (nll %s)", step, [round(x, 3) for x in losses.tolist()],
                     [round(x, 3) for x in nll.detach().tolist()])
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
