"""Reuse of the frozen prefix: hidden states entering the lowest edited decoder layer.

The decoder layers below the lowest edited one are never edited, so what they compute depends only
on the prompts. Within one training unit (or one edit call) the same micro-batches run through the
model again and again: every BP step caches keys at new weights, every meta-loss pass scores the
rephrases and locality prompts at new weights. :class:`FrozenPrefix` computes the hidden states
entering the first edited layer once per micro-batch and, on later passes, skips the layers below
it (they return their input unchanged) and feeds the stored states to the first edited layer. The
result is the same tensor the full forward would have produced there, so every loss, key and value
gradient is unchanged (tests compare against the plain path).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional, Sequence

from torch import Tensor, nn

from .spill import MemoryBudget, SpillPool, Stored


def decoder_layers(model: nn.Module, module_names: Sequence[str]) -> Optional[tuple[nn.ModuleList, int]]:
    """The model's list of decoder blocks and the index of the lowest block holding an edit module.

    None when the edit modules do not all sit in numbered blocks of one ``nn.ModuleList`` (then there
    is no frozen prefix to reuse).
    """
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    for list_name, blocks in sorted(lists, key=lambda item: -len(item[0])):
        prefix = f"{list_name}." if list_name else ""
        indices = []
        for name in module_names:
            head, _, _ = name[len(prefix):].partition(".") if name.startswith(prefix) else ("", "", "")
            if not head.isdigit() or int(head) >= len(blocks):
                break
            indices.append(int(head))
        else:
            return blocks, min(indices)
    return None


class FrozenPrefix:
    """Stores, per micro-batch, the hidden states entering block ``first`` and replays them.

    Use :meth:`forward_of` around every forward of a micro-batch (``with prefix.forward_of(batch):
    model(...)``). The first forward of a micro-batch runs in full and records the states; later ones
    skip blocks ``0 .. first-1``. Micro-batches are recognised by identity of their ``input_ids``
    tensor, and the stored states keep that tensor alive, so a recycled ``id`` cannot match. States past
    ``budget`` (default: none) are kept in a spill file and read back when replayed. Disabled
    (plain forwards) when the lowest edited block is the first one, when the model is in training mode
    (dropout would make the prefix random), or when no decoder blocks are found.
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str], budget: Optional[MemoryBudget] = None) -> None:
        found = decoder_layers(model, module_names)
        self.model = model
        self.blocks, self.first = found if found is not None else (None, 0)
        self._pool = SpillPool(budget if budget is not None else MemoryBudget(None))
        self._stored: dict[int, tuple[Tensor, Stored]] = {}
        self._returns_tuple: Optional[bool] = None

    @property
    def enabled(self) -> bool:
        return self.blocks is not None and self.first > 0 and not self.model.training

    @contextlib.contextmanager
    def forward_of(self, batch: Mapping[str, Tensor]) -> Iterator[None]:
        """Run the enclosed forward of ``batch`` with the prefix recorded (first time) or skipped."""
        if not self.enabled:
            yield
            return
        ids = batch["input_ids"]
        stored = self._stored.get(id(ids))
        if stored is not None and stored[0] is ids and self._returns_tuple is not None:
            with self._replay(stored[1].get()):
                yield
        else:
            with self._record(ids):
                yield

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _hidden_of(args: tuple, kwargs: dict[str, Any]) -> Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @contextlib.contextmanager
    def _record(self, ids: Tensor) -> Iterator[None]:
        def keep_input(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            previous = self._stored.get(id(ids))
            if previous is not None:
                previous[1].release()
            self._stored[id(ids)] = (ids, self._pool.store(self._hidden_of(args, kwargs).detach()))

        def note_structure(module: nn.Module, args: tuple, output: Any) -> None:
            self._returns_tuple = isinstance(output, tuple)

        handles = [self.blocks[self.first].register_forward_pre_hook(keep_input, with_kwargs=True),
                   self.blocks[0].register_forward_hook(note_structure)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def _replay(self, hidden: Tensor) -> Iterator[None]:
        as_tuple = self._returns_tuple

        def passthrough(hidden_states: Optional[Tensor] = None, *args: Any, **kwargs: Any) -> Any:
            return (hidden_states,) if as_tuple else hidden_states

        def feed_stored(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            current = self._hidden_of(args, kwargs)
            if current.shape != hidden.shape:
                raise RuntimeError(f"stored prefix states {tuple(hidden.shape)} do not fit this forward "
                                   f"{tuple(current.shape)}; the micro-batch changed after its first forward")
            replaced = hidden.to(current.device)
            if args:
                return (replaced, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replaced}

        skipped = [self.blocks[i] for i in range(self.first)]
        saved = [block.__dict__.get("forward") for block in skipped]
        handle = self.blocks[self.first].register_forward_pre_hook(feed_stored, with_kwargs=True)
        try:
            for block in skipped:
                block.forward = passthrough
            yield
        finally:
            handle.remove()
            for block, previous in zip(skipped, saved):
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous


def forward_context(prefix: Optional[FrozenPrefix], batch: Mapping[str, Tensor]) -> contextlib.AbstractContextManager:
    """``prefix.forward_of(batch)``, or a no-op when ``prefix`` is None."""
    return prefix.forward_of(batch) if prefix is not None else contextlib.nullcontext()
