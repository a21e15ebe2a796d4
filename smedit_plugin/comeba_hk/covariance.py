"""Key statistics ``C0_l = E[k k^T]`` at the input of each rewrite module, from a text corpus.

One forward pass collects every edited layer at once (stopping after the highest one), instead
of MEMIT's pass per layer. Documents are the non-empty lines of a UTF-8 text file (WikiText-2
by default, copied once into the plugin cache). Sums and counts are cached per model
fingerprint, layer, corpus, sample count, length and dtype in safetensors with MEMIT's
``count``/``mom2`` layout (``mom2`` is the raw sum, the moment is ``mom2 / count``).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import model_input_device
from ..fileio import save_safetensors_atomic
from ..fileio import cache_dir
from ..shipped import WIKITEXT2_TEST
from .modules import stop_after
from .templates import TokenView

#: The bundled corpus name accepted in ``mom2_dataset``.
WIKITEXT2 = "wikitext-2"
#: Padded tokens per forward of the statistics pass (memory bound, no effect on the result).
BATCH_TOKENS = 4096
#: Elements hashed per tensor for the model fingerprint (a strided sample keeps 8B models fast).
FINGERPRINT_SAMPLES = 4096
#: Seed of MEMIT's fixed pseudo-random document subset.
SUBSET_SEED = 1


def corpus_path(name: str) -> Path:
    """The text file behind ``mom2_dataset``: ``wikitext-2`` is the WikiText-2 test split packaged with the plugin."""
    if name != WIKITEXT2:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"hparams field 'mom2_dataset': {path} is not a file; use 'wikitext-2' or a UTF-8 text file")
        return path
    if not WIKITEXT2_TEST.is_file():
        raise FileNotFoundError(f"the packaged corpus {WIKITEXT2_TEST} is missing; reinstall smedit-plugin or point "
                                "'mom2_dataset' at any UTF-8 text file")
    return WIKITEXT2_TEST


def corpus_id(path: Path) -> str:
    """File stem plus a content hash, so an edited corpus never reuses stale statistics."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', path.stem)}-{digest}"


def read_documents(path: Path, n_samples: int) -> list[str]:
    """Non-empty lines of ``path``; more than ``n_samples`` -> MEMIT's fixed pseudo-random subset (seed 1)."""
    docs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not docs:
        raise ValueError(f"corpus {path} has no non-empty lines")
    if len(docs) > n_samples:
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n_samples]
        docs = [docs[i] for i in sorted(order.tolist())]
    return docs


def model_fingerprint(model: nn.Module, skip: Sequence[str] = ()) -> str:
    """A short hash of the config and a strided sample of every parameter (names containing ``skip`` excluded)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        fields = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(s in name for s in skip):
                continue
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].float().cpu()
            h.update(name.encode())
            h.update(str(tuple(param.shape)).encode() + str(param.dtype).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


def _token_batches(docs: list[list[int]]) -> list[list[list[int]]]:
    """Length-sorted documents packed so every padded batch holds at most :data:`BATCH_TOKENS` tokens."""
    ordered = sorted(docs, key=len)
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    for doc in ordered:
        if current and len(doc) * (len(current) + 1) > BATCH_TOKENS:
            batches.append(current)
            current = []
        current.append(doc)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def collect_second_moments(model: nn.Module, tok: Any, modules: dict[str, nn.Module], stop_module: nn.Module,
                           documents: list[str], max_len: int, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (sum_t k_t k_t^T, count)}`` over every non-padding token, all modules in one pass."""
    view = TokenView(tok)
    device = model_input_device(model)
    tokenized = [view.encode(doc)[:max_len] for doc in documents]
    tokenized = [ids for ids in tokenized if len(ids) > len(view.leading)]
    sums: dict[str, Optional[torch.Tensor]] = {name: None for name in modules}
    count = 0
    current_mask: list[torch.Tensor] = []

    def capture(name: str):
        def pre_hook(_mod: nn.Module, args: tuple) -> None:
            keys = args[0][current_mask[0].to(args[0].device)].to(dtype)
            total = keys.T @ keys
            sums[name] = total if sums[name] is None else sums[name].add_(total)
        return pre_hook

    handles = [module.register_forward_pre_hook(capture(name)) for name, module in modules.items()]
    try:
        for batch in tqdm(_token_batches(tokenized), desc="COMEBA-HK key statistics", unit="batch"):
            ids, mask = view.right_pad(batch, device)
            current_mask[:] = [mask.bool()]
            with stop_after(stop_module):
                model(input_ids=ids, attention_mask=mask)
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total, count) for name, total in sums.items()}


def stats_file(root: Path, fingerprint: str, module_name: str, corpus: str, n_samples: int, max_len: int,
               dtype: torch.dtype) -> Path:
    """Cache path of one layer's statistics."""
    dtype_name = str(dtype).replace("torch.", "")
    return root / fingerprint / f"{module_name}__{corpus}__n{n_samples}_len{max_len}_{dtype_name}.safetensors"


def second_moments(model: nn.Module, tok: Any, modules: dict[str, nn.Module], stop_module: nn.Module, *,
                   dataset: str, n_samples: int, max_len: int, dtype: torch.dtype, stats_dir: Optional[str],
                   fingerprint: str) -> dict[str, torch.Tensor]:
    """``E[k k^T]`` per module (on each module's weight device), from the cache or one statistics pass."""
    from safetensors.torch import load_file

    path = corpus_path(dataset)
    corpus = corpus_id(path)
    root = Path(stats_dir).expanduser() if stats_dir else cache_dir() / "comeba_hk" / "stats"
    files = {name: stats_file(root, fingerprint, name, corpus, n_samples, max_len, dtype) for name in modules}
    missing = {name: modules[name] for name, file in files.items() if not file.is_file()}
    if missing:
        collected = collect_second_moments(model, tok, missing, stop_module, read_documents(path, n_samples), max_len, dtype)
        for name, (total, count) in collected.items():
            save_safetensors_atomic({"mom2": total, "count": torch.tensor(count, dtype=torch.long)}, files[name],
                                    metadata={"corpus": corpus, "n_samples": str(n_samples), "max_len": str(max_len),
                                              "n_tokens": str(count), "fingerprint": fingerprint})
    moments = {}
    for name, file in files.items():
        data = load_file(str(file))
        device = modules[name].weight.device
        moments[name] = (data["mom2"].to(dtype) / float(data["count"])).to(device)
    return moments
