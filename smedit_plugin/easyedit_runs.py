"""Methods run end to end through the installed EasyEdit's ``BaseEditor``, for side-by-side comparisons.

Two uses in ``smedit compare``: EasyEdit's own methods (``easyedit:FT``, ``easyedit:MEMIT``, ...)
with EasyEdit's own YAML, and ``--via-easyedit`` for the plugin's methods, so EasyEdit's metric
dicts sit next to ours (:class:`EasyEditRunner`). Edits are applied with ``sequential_edit=True`` so they
stay in the model for our scoring, and the runner rolls them back.
When EasyEdit cannot run a method here, :class:`EasyEditUnavailable` carries the reason for the row.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import io
import json
import re
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from .editing import WeightsSnapshot
from .errors import MethodUnavailable
from .families import Bench, FamilyRunner, MethodChoice, Training
from .fileio import atomic_path, cache_dir, save_safetensors_atomic, write_json_atomic
from .records import EditRecord
from .requests import to_edit_kwargs
from .shipped import WIKITEXT2_TEST, easyedit_hparams_root


class EasyEditUnavailable(MethodUnavailable):
    """EasyEdit cannot run this method on this machine; the message says why (it goes into the result row)."""


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def builtin_hparams_path(method: str, model_key: str, root: Path) -> Path:
    """``root/<method>/<model_key>.yaml`` (EasyEdit's layout: ``hparams/FT/llama3-8b.yaml``)."""
    for suffix in (".yaml", ".yml"):
        path = root / method / f"{model_key}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no EasyEdit hparams for easyedit:{method} and model {model_key!r}: expected "
                            f"{root / method / (model_key + '.yaml')}; point --easyedit-hparams at a folder laid out "
                            "like EasyEdit's hparams/ (METHOD/MODEL.yaml)")


def import_runnable_easyedit() -> Any:
    """The installed ``easyeditor``, or :class:`EasyEditUnavailable` if its ``BaseEditor`` cannot run here."""
    from . import easyedit

    try:
        easyedit.install_transformers_shim()
        module = easyedit.import_easyeditor(tolerate_missing_vision=True)
    except ImportError as exc:
        raise EasyEditUnavailable(f"EasyEdit is not importable: {exc}") from None
    if easyedit.detect_era() == "A" and not torch.cuda.is_available():
        raise EasyEditUnavailable("the installed EasyEdit (0.0.1.dev0, the 2023 wheel) hard-codes CUDA in BaseEditor "
                                  "and there is no GPU; put EasyEdit's current source on PYTHONPATH "
                                  "(tests/easyedit_env.md)")
    return module


def builtin_hparams_class(module: Any, alg_name: str) -> type:
    """EasyEdit's ``<ALG>HyperParams`` class for ``alg_name`` (``FT`` -> ``FTHyperParams``, ``R-ROME`` -> ``R_ROMEHyperParams``)."""
    wanted = _normalise(alg_name) + "hyperparams"
    for attr in dir(module):
        if _normalise(attr) == wanted and isinstance(getattr(module, attr), type):
            return getattr(module, attr)
    raise EasyEditUnavailable(f"the installed EasyEdit has no hyperparameter class for {alg_name!r}")


def load_builtin_hparams(method: str, model_key: str, root: Path) -> Any:
    """EasyEdit's own hparams object for ``easyedit:<method>`` from ``root/<method>/<model_key>.yaml``."""
    import yaml

    module = import_runnable_easyedit()
    path = builtin_hparams_path(method, model_key, root)
    alg_name = (yaml.safe_load(path.read_text()) or {}).get("alg_name", method)
    return builtin_hparams_class(module, alg_name).from_hparams(str(path))


def easyedit_stats_file(hparams: Any, model: torch.nn.Module, layer: int) -> Path:
    """Where EasyEdit's ``layer_stats`` looks for a layer's cached second moment (its own naming scheme)."""
    model_name = str(model.config._name_or_path).rsplit("/")[-1]
    layer_name = hparams.rewrite_module_tmp.format(layer)
    name = f"{layer_name}_{hparams.mom2_dtype}_mom2_{hparams.mom2_n_samples}.npz"
    return Path(hparams.stats_dir) / model_name / f"{hparams.mom2_dataset}_stats" / name


def seed_covariance_from_text(hparams: Any, model: torch.nn.Module, tok: Any, text: Path) -> list[Path]:
    """Write EasyEdit's covariance cache for each edit layer from a local text file.

    EasyEdit's MEMIT family downloads Wikipedia for ``E[k kᵀ]`` unless ``layer_stats`` finds its
    ``.npz`` cache; without network that download fails, so the cache is filled from ``text`` (all
    its lines, however many ``mom2_n_samples`` asks for) in EasyEdit's ``SecondMoment`` layout.
    Existing files are kept.
    """
    from .comeba_hk.covariance import collect_second_moments, read_documents

    layers = list(hparams.layers)
    files = {layer: easyedit_stats_file(hparams, model, layer) for layer in layers}
    missing = {layer: f for layer, f in files.items() if not f.is_file()}
    if not missing:
        return list(files.values())
    modules = {hparams.rewrite_module_tmp.format(layer): model.get_submodule(hparams.rewrite_module_tmp.format(layer))
               for layer in missing}
    stop = model.get_submodule(hparams.rewrite_module_tmp.format(max(missing)))
    dtype = getattr(torch, hparams.mom2_dtype)
    collected = collect_second_moments(model, tok, modules, stop, read_documents(text, int(hparams.mom2_n_samples)),
                                       max_len=1024, dtype=dtype)
    for layer, path in missing.items():
        total, count = collected[hparams.rewrite_module_tmp.format(layer)]
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **{"mom2.constructor": np.array("easyeditor.util.runningstats.SecondMoment()"),
                                    "mom2.count": np.array(count), "mom2.mom2": total.cpu().numpy(),
                                    "sample_size": np.array(int(hparams.mom2_n_samples))})
    return list(files.values())


def method_module(alg_name: str) -> ModuleType:
    """The module of EasyEdit's apply function for ``alg_name`` (where the method keeps its state between calls)."""
    algorithms = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    if alg_name not in algorithms:
        raise EasyEditUnavailable(f"EasyEdit has no method {alg_name!r} registered; for the plugin's methods call "
                                  "smedit_plugin.register() first")
    return sys.modules[algorithms[alg_name].__module__]


def null_space_file(hparams: Any, model: torch.nn.Module) -> Path:
    """Where the runner keeps a null-space method's projections ``P`` (AlphaEdit's ``P_loc``), beside the statistics
    they come from, named by everything they depend on."""
    layers = "-".join(str(layer) for layer in hparams.layers)
    module = hparams.rewrite_module_tmp.format("L")
    name = (f"{hparams.alg_name}_P_{module}_{layers}_{hparams.mom2_dtype}_{hparams.mom2_n_samples}"
            f"_t{hparams.nullspace_threshold:g}.pt")
    return easyedit_stats_file(hparams, model, hparams.layers[0]).parent / name


def write_null_space(hparams: Any, model: torch.nn.Module, tok: Any, path: Path) -> None:
    """The method's own ``get_project`` for each layer, stacked as its ``P_loc`` file holds them (once per model).

    EasyEdit computes ``P`` itself when ``P_loc`` is missing, but writes it to ``./null_space_project.pt`` in the
    working folder and keeps recomputing it on every call unless ``P_loc`` names that file; a stale file there
    from another model would be loaded without a check. So the runner computes it once into its cache.
    """
    if path.is_file():
        return
    project = method_module(hparams.alg_name).get_project
    stacked = torch.stack([project(model, tok, layer, hparams).float().cpu() for layer in hparams.layers])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(stacked, tmp)


#: EasyEdit's locate-then-edit methods, which find the subject's token by position in right-padded batches; its
#: other methods (FT, LoRA, ...) mask the prompt assuming left padding. ``BaseEditor.__init__`` sets the tokenizer's
#: side so only for models it loads by name; for a model in memory the runner sets it around each call.
RIGHT_PADDED_METHODS = frozenset({"ROME", "R-ROME", "MEMIT", "EMMET", "EAMET", "AlphaEdit", "CORE", "SPHERE"})


@contextlib.contextmanager
def easyedit_padding(tok: Any, alg_name: str) -> Iterator[None]:
    """The tokenizer padded on the side EasyEdit's editor gives ``alg_name``, and as it was afterwards."""
    before = tok.padding_side
    tok.padding_side = "right" if alg_name in RIGHT_PADDED_METHODS else "left"
    try:
        yield
    finally:
        tok.padding_side = before


#: Global values an EasyEdit method module may keep between calls (AlphaEdit's ``cache_c``, ``P``, ``P_loaded``,
#: MEMIT's ``COV_CACHE``, the context templates); modules, functions and classes are left alone.
_STATE_TYPES = (bool, int, float, str, bytes, type(None), torch.Tensor, np.ndarray, dict, list, tuple, set)


def module_state_undo(module: ModuleType) -> Callable[[], None]:
    """An undo step that puts ``module``'s global state back as it is now (values removed if added since).

    EasyEdit's methods keep state across calls in module globals: AlphaEdit accumulates the keys of
    every edit so far in ``cache_c`` (that is how its sequential editing protects earlier edits), so
    it must carry over from chunk to chunk and start empty again when the edits are rolled back.
    """
    saved = {k: copy.deepcopy(v) for k, v in vars(module).items()
             if not k.startswith("__") and isinstance(v, _STATE_TYPES)}

    def undo() -> None:
        for name in [k for k, v in vars(module).items()
                     if not k.startswith("__") and isinstance(v, _STATE_TYPES) and k not in saved]:
            delattr(module, name)
        for name, value in saved.items():
            setattr(module, name, copy.deepcopy(value))

    return undo


#: EasyEdit methods whose edits are new values of the model's own parameters plus their module's globals (they add
#: no modules or hooks), so a run of them can be saved and continued in another process.
PARAMETER_EDITING_METHODS = frozenset({"MEMIT", "AlphaEdit", "FT", "ROME", "R-ROME", "EMMET"})
#: EasyEdit methods whose edits live in one module they put in place of a layer of the model, by the names (in the
#: method's modules) of the class that puts it there and of its class: GRACE's codebook adaptor. A run's state holds
#: that module's own tensors and attributes; loading it lets the method put a fresh adaptor in place, then fills it.
ADAPTOR_METHODS = {"GRACE": ("GRACE", "GRACEAdapter")}
#: EasyEdit methods that wrap the model in a model of their own on their first edit, by the name of the method module's
#: function that does it (and, given no records and no steps, only that): LoRA puts PEFT's model around it and
#: adapters into its layers. A run's state holds the new parameters; loading it lets the method wrap the model, then
#: fills them.
WRAPPING_METHODS = {"LoRA": "execute_lora"}
#: Module globals that are caches EasyEdit fills again from files on its next call (the covariance, AlphaEdit's
#: ``P``, read from ``P_loc`` while ``P_loaded`` is false): not saved with a run's state.
RELOADED_GLOBALS = frozenset({"COV_CACHE", "P", "P_loaded"})
#: Files of :meth:`EasyEditRunner.save_state`.
EDITED_FILE, GLOBALS_FILE, STATE_JSON = "edited.safetensors", "module_globals.safetensors", "easyedit_state.json"
#: The adaptor of an :data:`ADAPTOR_METHODS` run, and the random number generators' states (GRACE draws values with
#: ``torch.rand`` in every forward, so a continued run needs the stream where the saved run left it).
ADAPTOR_FILE, RNG_FILE = "adaptor.pt", "rng.safetensors"
#: The parameters a :data:`WRAPPING_METHODS` run added to the model (LoRA's adapters).
ADDED_FILE = "added.safetensors"


def _saved_globals(module: ModuleType) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The method module's globals a continued run needs: tensors, and the rest as JSON (refused if not JSON)."""
    tensors, plain = {}, {}
    for name, value in vars(module).items():
        if name.startswith("__") or name in RELOADED_GLOBALS or not isinstance(value, _STATE_TYPES):
            continue
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous()
            continue
        try:
            plain[name] = json.loads(json.dumps(value))
        except TypeError:
            raise TypeError(f"{module.__name__}.{name} ({type(value).__name__}) cannot be saved with the run's state; "
                            "this method's runs start over") from None
    return tensors, plain


def _adaptor_classes(alg_name: str) -> tuple[type, type]:
    """(the class that installs the adaptor, the adaptor's class) of an :data:`ADAPTOR_METHODS` method."""
    installer_name, adaptor_name = ADAPTOR_METHODS[alg_name]
    installer = getattr(method_module(alg_name), installer_name)
    return installer, getattr(sys.modules[installer.__module__], adaptor_name)


def flatten_nested(value: Any) -> tuple[list[str], list[Any]]:
    """``value``, lists and tuples nested to any depth, as flat lists of kinds (``list``, ``tuple``, ``leaf``) and
    items (a container's length, or the leaf; tensors detached), in pre-order and without recursion: GRACE's
    ``edit_ids`` nest one level deeper with every key it adds, past what pickle's recursion allows at about 450."""
    kinds, items, stack = [], [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            kinds.append(type(item).__name__)
            items.append(len(item))
            stack.extend(reversed(item))
        else:
            kinds.append("leaf")
            items.append(item.detach() if isinstance(item, torch.Tensor) else item)
    return kinds, items


def unflatten_nested(kinds: Sequence[str], items: Sequence[Any]) -> Any:
    """The value :func:`flatten_nested` took apart, rebuilt without recursion."""
    frames: list[tuple[str, int, list[Any]]] = [("list", 1, [])]  # (kind, length, children so far)
    for kind, item in zip(kinds, items):
        if kind == "leaf":
            frames[-1][2].append(item)
        else:
            frames.append((kind, item, []))
        while len(frames) > 1 and len(frames[-1][2]) == frames[-1][1]:
            done, _, children = frames.pop()
            frames[-1][2].append(tuple(children) if done == "tuple" else children)
    return frames[0][2][0]


def adaptor_state(model: torch.nn.Module, alg_name: str) -> Optional[dict[str, Any]]:
    """The adaptor an :data:`ADAPTOR_METHODS` method put into ``model`` (None before its first edit): its module
    name, its own parameters (not the wrapped layer's) and its other attributes except the hparams and device."""
    _, adaptor_class = _adaptor_classes(alg_name)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, adaptor_class)]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{alg_name} put {len(found)} adaptors into the model ({[n for n, _ in found]}); "
                         "a run's state carries one")
    name, adaptor = found[0]
    wrapped = {id(p) for child in adaptor.children() for p in child.parameters()}
    return {"name": name,
            "parameters": {k: (p.detach(), p.requires_grad) for k, p in adaptor._parameters.items()
                           if p is not None and id(p) not in wrapped},
            "attributes": {k: flatten_nested(v) for k, v in vars(adaptor).items()
                           if not k.startswith("_") and k not in ("config", "device")}}


def install_adaptor(model: torch.nn.Module, hparams: Any, saved: dict[str, Any]) -> None:
    """Let the method put a fresh adaptor into ``model`` (as its first edit does), then give it ``saved``'s state."""
    installer, adaptor_class = _adaptor_classes(hparams.alg_name)
    installer(model=model, config=hparams, device=next(model.parameters()).device)
    adaptor = model.get_submodule(saved["name"])
    if not isinstance(adaptor, adaptor_class):
        raise ValueError(f"{hparams.alg_name} put its adaptor elsewhere than the saved run's {saved['name']!r}: "
                         "the state comes from other hparams")
    device = adaptor.weight.device
    for key, (value, grad) in saved["parameters"].items():
        setattr(adaptor, key, torch.nn.Parameter(value.to(device), requires_grad=grad))
    for key, (kinds, items) in saved["attributes"].items():
        setattr(adaptor, key, unflatten_nested(kinds, items))


def rng_states() -> dict[str, torch.Tensor]:
    """The CPU generator's state, and each CUDA device's when CUDA is in use."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda:")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def _scalar(value: Any) -> float:
    return float(np.mean(value)) if isinstance(value, (list, tuple, np.ndarray)) else float(value)


def summarise_metrics(metrics: Sequence[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Means of EasyEdit's post-edit ``rewrite_acc``, ``rephrase_acc``, ``locality.*_acc`` and ``portability.*_acc``.

    A record's locality (portability) is the mean of its keys first; None when no record has one.
    """
    rewrite, rephrase, sections = [], [], {"locality": [], "portability": []}
    for record in metrics:
        post = record.get("post", {})
        if "rewrite_acc" in post:
            rewrite.append(_scalar(post["rewrite_acc"]))
        if "rephrase_acc" in post:
            rephrase.append(_scalar(post["rephrase_acc"]))
        for section, means in sections.items():
            accs = [_scalar(v) for k, v in (post.get(section) or {}).items() if k.endswith("_acc")]
            if accs:
                means.append(float(np.mean(accs)))
    return {"efficacy": _mean(rewrite), "generalization": _mean(rephrase), "specificity": _mean(sections["locality"]),
            "portability": _mean(sections["portability"])}


def editor_kwargs(records: Sequence[EditRecord], *, batch: bool, era: Optional[str]) -> dict[str, Any]:
    """:func:`~smedit_plugin.requests.to_edit_kwargs` under the names the installed editor's ``edit``/``batch_edit`` take.

    The 2023 wheel's ``batch_edit`` has no ``locality_inputs``/``portability_inputs`` parameters: it
    passes its ``locality_prompts`` and ``locality_ground_truth`` on to ``_prepare_requests`` in
    exactly those two positions, so the dicts go in under these names (the real names would reach
    ``_prepare_requests`` twice and raise). Its ``edit`` and every current-source method take the
    real names.
    """
    kwargs = to_edit_kwargs(list(records))
    if batch and era == "A":
        for ours, wheel in (("locality_inputs", "locality_prompts"), ("portability_inputs", "locality_ground_truth")):
            if ours in kwargs:
                kwargs[wheel] = kwargs.pop(ours)
    return kwargs


class EasyEditRunner(FamilyRunner):
    """A method run end to end through the installed EasyEdit's ``BaseEditor``: EasyEdit's own methods
    (``easyedit:FT``, with EasyEdit's YAML from ``bench.easyedit_hparams``) and, for ``--via-easyedit``,
    the plugin's (``choice.hparams`` given).

    Batchable methods go through ``batch_edit``; the others through ``edit``, one record at a time
    (EasyEdit does not batch them). Records carry their locality and portability questions, so EasyEdit's
    own metric dicts (:meth:`report`) include both. Edits are applied with ``sequential_edit=True``, so they
    accumulate chunk after chunk as in EasyEdit's own sequential editing (one editor per run; the method's
    state between calls, such as AlphaEdit's ``cache_c``, carries over), and are rolled back by this runner:
    the model object for object (:meth:`WeightsSnapshot.capture_model`: parameters, buffers, the module tree
    with its hooks, what training set on the side), so methods that add or wrap modules (GRACE, LoRA,
    COMEBA-HK's hook layers) are undone too, and the global state of EasyEdit's method module, so the next
    run starts as in a fresh process. The seconds of an edit are those of the method's apply function only,
    not of EasyEdit's own evaluation around it.
    """

    def __init__(self, bench: Bench, choice: MethodChoice) -> None:
        super().__init__(bench, choice)
        self.editor: Any = None
        self._batchable: Optional[bool] = None  # known after prepare()
        self.metrics: list[dict[str, Any]] = []
        self.mode = ""
        self._seconds = 0.0
        self._wrapped: Optional[torch.nn.Module] = None  # what a loaded state of a wrapping method edits next

    def prepare(self, training: Optional[Training] = None) -> dict[str, Any]:
        """EasyEdit's hparams (its own YAML unless given), with the covariance cache seeded from local text."""
        module = import_runnable_easyedit()
        if self.hparams is None:
            bench = self.bench
            try:
                hp = load_builtin_hparams(self.choice.method, bench.model_key,
                                          bench.easyedit_hparams or easyedit_hparams_root())
            except FileNotFoundError as exc:
                raise EasyEditUnavailable(str(exc)) from None
            if all(hasattr(hp, f) for f in ("mom2_dataset", "mom2_n_samples", "stats_dir", "layers")):
                hp = dataclasses.replace(hp, stats_dir=str(cache_dir() / "easyedit_stats"))
                seed_covariance_from_text(hp, bench.model, bench.tok, WIKITEXT2_TEST)
                if hasattr(hp, "P_loc"):
                    hp = dataclasses.replace(hp, P_loc=str(null_space_file(hp, bench.model)))
                    write_null_space(hp, bench.model, bench.tok, Path(hp.P_loc))
            self.hparams = hp
        self._batchable = module.editors.batch_editor.BatchEditor.is_batchable_method(self.hparams.alg_name)
        return {}

    def capture(self, snapshot: WeightsSnapshot) -> None:
        snapshot.capture_model()
        module = method_module(self.hparams.alg_name)
        if module.__name__.startswith("easyeditor."):
            snapshot.on_restore(module_state_undo(module))

    def _editor(self, chunk_size: int) -> Any:
        """``BaseEditor`` for the bench's model, its ``apply_algo`` timed."""
        from .easyedit_editor import load_editor

        hparams = self.hparams
        if any(f.name == "batch_size" for f in dataclasses.fields(hparams)):  # ROME's class has none
            hparams = dataclasses.replace(hparams, batch_size=chunk_size if self._batchable else 1)
        editor = load_editor(hparams, self._wrapped or self.bench.model, self.bench.tok)
        apply = editor.apply_algo

        def timed_apply(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return apply(*args, **kwargs)
            finally:
                self._seconds += time.perf_counter() - start

        editor.apply_algo = timed_apply
        self.mode = (f"batch_edit, chunks of {chunk_size}" if self._batchable
                     else "edit, one record at a time (EasyEdit does not batch this method)")
        return editor

    def edit(self, records: Sequence[EditRecord]) -> float:
        from .easyedit import detect_era

        if self._batchable is None:
            raise RuntimeError("EasyEditRunner.edit before prepare(): prepare() loads EasyEdit and its hparams")
        self._capture_once()
        if self.editor is None:
            self.editor = self._editor(len(records))
        before = self._seconds
        call = self.editor.batch_edit if self._batchable else self.editor.edit
        own = method_module(self.hparams.alg_name).__name__.startswith("easyeditor.")
        with easyedit_padding(self.bench.tok, self.hparams.alg_name) if own else contextlib.nullcontext():
            chunk_metrics, _, _ = call(**editor_kwargs(list(records), batch=self._batchable, era=detect_era()),
                                       sequential_edit=True, verbose=False)
        self.metrics.extend(chunk_metrics)
        return self._seconds - before

    def roll_back(self) -> None:
        super().roll_back()
        self.editor = None  # a fresh editor for the next edit: EasyEdit's holds the model it edited
        self._wrapped = None

    @property
    def resumable(self) -> bool:  # type: ignore[override]
        """Methods that only change existing parameters and their module's globals (:data:`PARAMETER_EDITING_METHODS`),
        those whose edits live in one adaptor module (:data:`ADAPTOR_METHODS`) and those that wrap the model
        (:data:`WRAPPING_METHODS`)."""
        return self.hparams is not None and (self.hparams.alg_name in PARAMETER_EDITING_METHODS
                                             or self.hparams.alg_name in ADAPTOR_METHODS
                                             or self.hparams.alg_name in WRAPPING_METHODS)

    def save_state(self, folder: Path) -> None:
        """The parameters the edits changed or added, an adaptor method's adaptor, the method module's globals
        (AlphaEdit's ``cache_c``, the context templates), the random number generators and EasyEdit's own metrics so
        far."""
        if not self.resumable:
            super().save_state(folder)
        self._capture_once()
        folder = Path(folder)
        tensors, plain = _saved_globals(method_module(self.hparams.alg_name))
        save_safetensors_atomic(self.snapshot.changed(), folder / EDITED_FILE)
        save_safetensors_atomic(tensors, folder / GLOBALS_FILE)
        save_safetensors_atomic(rng_states(), folder / RNG_FILE)
        if self.hparams.alg_name in WRAPPING_METHODS:
            save_safetensors_atomic(self.snapshot.added(), folder / ADDED_FILE)
        if self.hparams.alg_name in ADAPTOR_METHODS:
            with atomic_path(folder / ADAPTOR_FILE) as tmp:
                torch.save(adaptor_state(self.bench.model, self.hparams.alg_name), tmp)
        write_json_atomic(folder / STATE_JSON, {"alg_name": self.hparams.alg_name, "globals": plain,
                                                "metrics": self.metrics})

    @torch.no_grad()
    def load_state(self, folder: Path) -> None:
        """Put a saved run's edits into the unedited model and its globals into the method module; roll back undoes
        both."""
        if not self.resumable:
            super().load_state(folder)
        folder = Path(folder)
        info = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        if info["alg_name"] != self.hparams.alg_name:
            raise ValueError(f"{folder} holds a run of {info['alg_name']}, not of {self.hparams.alg_name}")
        edited = load_file(str(folder / EDITED_FILE))
        params = dict(self.bench.model.named_parameters())
        wrong = sorted(n for n, t in edited.items() if n not in params or params[n].shape != t.shape)
        if wrong:
            raise ValueError(f"{folder / EDITED_FILE} holds parameters this model does not have: {wrong[:3]}")
        self._capture_once()
        try:
            self._load_into_model(folder, info, edited, params)
        except BaseException:
            self.roll_back()  # a load that fails midway leaves the unedited model and globals
            raise

    def _load_into_model(self, folder: Path, info: dict[str, Any], edited: dict[str, torch.Tensor],
                         params: dict[str, torch.nn.Parameter]) -> None:
        for name, value in edited.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
        module = method_module(self.hparams.alg_name)
        _, now = _saved_globals(module)
        for name, value in info["globals"].items():
            if now.get(name, object()) != value:  # constants stay the objects (tuples) the module made
                setattr(module, name, value)
        for name, value in load_file(str(folder / GLOBALS_FILE)).items():
            setattr(module, name, value)
        if self.hparams.alg_name in ADAPTOR_METHODS:
            device = next(self.bench.model.parameters()).device
            saved = torch.load(folder / ADAPTOR_FILE, map_location=device, weights_only=True)
            if saved is not None:
                install_adaptor(self.bench.model, self.hparams, saved)
        if self.hparams.alg_name in WRAPPING_METHODS:
            self._wrap_with(load_file(str(folder / ADDED_FILE)))
        if (folder / RNG_FILE).is_file():  # states written before it existed continue without it
            set_rng_states(load_file(str(folder / RNG_FILE)))
        self.metrics = list(info["metrics"])

    def _wrap_with(self, added: dict[str, torch.Tensor]) -> None:
        """Let the method wrap the model as its first edit does (no records, no steps), then give the parameters it
        added the saved values; the wrapping model is what the next edit edits (as the editor's model would be)."""
        if not added:  # saved before the first edit
            return
        wrap = getattr(method_module(self.hparams.alg_name), WRAPPING_METHODS[self.hparams.alg_name])
        with contextlib.redirect_stdout(io.StringIO()):  # its count of trainable parameters
            wrapped = wrap(self.bench.model, self.bench.tok, [], dataclasses.replace(self.hparams, num_steps=0))
        params = dict(self.bench.model.named_parameters())
        wrong = (sorted(set(self.snapshot.added()) ^ set(added))
                 or sorted(n for n, t in added.items() if params[n].shape != t.shape))
        if wrong:
            raise ValueError(f"{self.hparams.alg_name} added other parameters than the saved run's "
                             f"(e.g. {wrong[:3]}): the state comes from other hparams")
        for name, value in added.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
        self._wrapped = wrapped

    def report(self) -> dict[str, Any]:
        return {"easyedit": summarise_metrics(self.metrics), "easyedit_mode": self.mode}
