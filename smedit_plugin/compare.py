"""Side-by-side runs of the plugin's methods on the same model, records and protocol.

Each method is trained (or its archive reused) on the same training records, edits the same
evaluation records and is scored on the final model; results come back as rows with the same
fields for every method, printed as a table and written as JSON. ``easyedit:<METHOD>`` entries run
EasyEdit's own methods through its ``BaseEditor`` on the same model, records and protocol, and
``via_easyedit`` also runs the plugin's methods through ``BaseEditor`` so EasyEdit's metric dicts
can be checked against ours.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .data import EditRecord, load_records
from .easyedit_runs import (EasyEditUnavailable, load_builtin_hparams, run_through_editor, seed_covariance_from_text,
                            split_method, summarise_metrics)
from .evaluation import evaluate_records, predict_locality_reference
from .fileio import write_json_atomic
from .hparams import HyperParamsError, load_hparams
from .fileio import cache_dir
from .models import load_model_and_tokenizer
from .methods import METHODS

PROTOCOLS = ("batch", "sequential", "consecutive", "single-round")
ROW_FIELDS = ("method", "model", "dataset", "protocol", "n_edits", "num_seq", "efficacy", "generalization",
              "specificity", "train_s_per_edit", "edit_s_per_edit", "peak_rss_mb")
METRIC_NAMES = ("efficacy", "generalization", "specificity")
LOCATE_PROTOCOLS = ("consecutive", "single-round")


def hparams_dir() -> Path:
    """The hparams tree: ``$SMEDIT_HPARAMS_DIR`` or the YAMLs shipped in the package."""
    from .shipped import hparams_root

    return hparams_root()


def method_hparams(method: str, model_key: str, *, training: bool, root: Optional[Path] = None):
    """The shipped YAML of ``method`` for ``model_key`` (``-seq`` variants are picked by the caller)."""
    base = (root or hparams_dir()) / ("TRAINING" if training else "") / method / f"{model_key}.yaml"
    if not base.is_file():
        raise HyperParamsError(f"no hparams file {base} for method {method!r} and model {model_key!r}")
    return load_hparams(base)


def builtin_hparams_dir() -> Path:
    """EasyEdit-format YAMLs of EasyEdit's own methods for the plugin's CPU models (``hparams/EASYEDIT``)."""
    return hparams_dir() / "EASYEDIT"


def local_text() -> Path:
    """The bundled WikiText-2 text that stands in for EasyEdit's covariance corpus download."""
    from .comeba_hk.covariance import WIKITEXT2, corpus_path

    return corpus_path(WIKITEXT2)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path) and part.is_file():
            h.update(part.read_bytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


@dataclasses.dataclass
class CompareConfig:
    model: str
    dataset: str
    train_data: Optional[Path]
    eval_data: Path
    methods: list[str]
    protocol: str = "batch"
    n_edits: int = 64
    num_seq: int = 1
    batch_size: int = 10
    archive_root: Optional[Path] = None
    retrain: bool = False
    curve_every: int = 0
    progress: bool = True
    easyedit_hparams: Optional[Path] = None
    via_easyedit: bool = False
    general_every: int = 0
    general_items: int = 100
    general_tokens: int = 4096

    @property
    def locate(self) -> bool:
        return self.protocol in LOCATE_PROTOCOLS

    @property
    def chunk_size(self) -> int:
        """Facts per edit call: one batch (batch, sequential) or one step (consecutive, single-round)."""
        return self.batch_size if self.locate else self.n_edits


def parse_methods(text: str) -> list[str]:
    """``--methods`` split on the commas that are not inside an entry's ``[...]`` overrides."""
    entries, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            entries.append(current.strip())
            current = ""
        else:
            current += char
    entries.append(current.strip())
    return [e for e in entries if e]


def method_overrides(entry: str) -> tuple[str, dict[str, Any]]:
    """``"SMEdit[reg_coef=0,bp_steps=3]"`` -> ``("SMEdit", {"reg_coef": 0, "bp_steps": 3})`` (values parsed as JSON).

    Lets one run hold a method beside a variant of itself (e.g. the paper's l2 coefficient and none).
    """
    match = re.fullmatch(r"\s*([^\[\]]+?)\s*(?:\[(.*)\])?\s*", entry)
    if match is None:
        raise ValueError(f"--methods entry {entry!r} is not METHOD or METHOD[field=value,...]")
    name, inner = match.group(1), match.group(2)
    overrides: dict[str, Any] = {}
    for item in [] if inner is None else [i for i in inner.split(",") if i.strip()]:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise ValueError(f"--methods entry {entry!r}: override {item!r} is not field=value")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value.strip()
    return name, overrides


def _score(cfg: CompareConfig, model, tok, records: Sequence[EditRecord], reference: Optional[list],
           progress: bool = False) -> dict[str, Any]:
    """The protocol's metrics: the SMEdit paper's for batch/sequential, the COMEBA-HK paper's otherwise."""
    if cfg.locate:
        return evaluate_records(model, tok, list(records), dataset=cfg.dataset, locality="agreement",
                                reference=reference, scoring="accuracy", progress=progress)
    return evaluate_records(model, tok, list(records), dataset=cfg.dataset, progress=progress)


def _hypernet_row(cfg: CompareConfig, method: str, model, tok, train: Sequence[EditRecord],
                  evaluation: Sequence[EditRecord], probe: Optional[Probe] = None,
                  overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from .hypernet.archive import load_archive, read_meta
    from .hypernet.workflow import edit_and_evaluate, train_hypernet

    sequential = cfg.protocol == "sequential"
    train_hp = method_hparams(method, cfg.model, training=True)
    seq_file = hparams_dir() / "TRAINING" / method / f"{cfg.model}-seq.yaml"
    if sequential and seq_file.is_file():
        train_hp = load_hparams(seq_file)
    train_hp = train_hp.replace(**(overrides or {}), n_edits=cfg.n_edits, num_seq=cfg.num_seq, val_n_edits=cfg.n_edits,
                                max_steps=-1)
    key = _fingerprint(method, cfg.model, cfg.dataset, train_hp.to_dict(), cfg.train_data)
    root = cfg.archive_root or (cache_dir() / "archives")
    archive = root / f"{method}-{cfg.model}-{cfg.dataset}-{cfg.protocol}-{key}"
    train_s_per_edit = None
    complete = (archive / "meta.json").is_file() and read_meta(archive).get("complete")
    if cfg.retrain or not complete:
        result = train_hypernet(model, tok, train_hp, train, archive, model_name=cfg.model, dataset=cfg.dataset,
                                progress=cfg.progress, resume=not cfg.retrain)
        train_s_per_edit = result.seconds_per_edit
        _mark_complete(archive, train_s_per_edit)
    else:
        train_s_per_edit = read_meta(archive).get("train_s_per_edit")
    editor, _ = load_archive(archive, model, train_hp)
    metrics = edit_and_evaluate(model, tok, editor, list(evaluation), n_edits=cfg.n_edits, dataset=cfg.dataset,
                                curve_every=cfg.curve_every, progress=cfg.progress, after_batch=probe)
    row = {"train_s_per_edit": train_s_per_edit, "edit_s_per_edit": metrics["edit_seconds"] / len(evaluation),
           "archive": str(archive), **{k: metrics[k] for k in ("efficacy", "generalization", "specificity")}}
    if "curve" in metrics:
        row["curve"] = metrics["curve"]
    return row


Probe = Callable[[int], None]


def _general_probe(cfg: CompareConfig, model, tok, points: list[dict[str, Any]]) -> Optional[Probe]:
    """``probe(batch_no)``: the general-capability report after every ``general_every``-th and the last batch."""
    if not cfg.general_every:
        return None

    def probe(batch_no: int) -> None:
        if batch_no % cfg.general_every == 0 or batch_no == cfg.num_seq:
            points.append({"num_seq": batch_no, **_general(cfg, model, tok)})
    return probe


def _general(cfg: CompareConfig, model, tok) -> dict[str, Any]:
    from .general import general_report

    report = general_report(model, tok, n_items=cfg.general_items, ppl_tokens=cfg.general_tokens,
                            progress=cfg.progress)
    return {"glue": report["glue"], "perplexity": report["perplexity"], "seconds": report["seconds"]}


def _locate_row(cfg: CompareConfig, method: str, model, tok, evaluation: Sequence[EditRecord],
                reference: Optional[list], probe: Optional[Probe] = None,
                overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """COMEBA-HK / MEMIT-C: consecutive batches that accumulate, or single rounds rolled back after each batch.

    Under the batch and sequential protocols the same code edits ``num_seq`` batches of ``n_edits``
    (one step per batch), scored like the hypernetwork methods beside it.

    Metrics follow the COMEBA-HK paper: reliability / generality as teacher-forced token accuracy and
    locality as agreement with the unedited model's predictions (``efficacy`` / ``generalization`` /
    ``specificity`` in the row, plus their ``average``).
    """
    from .comeba_hk.state import remove_hook_layers
    from .data import to_requests

    hp = method_hparams(method, cfg.model, training=False).replace(**(overrides or {}), batch_size=cfg.chunk_size)
    apply = METHODS[method].apply_function()
    rewritten = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in rewritten}
    starts = range(0, len(evaluation), cfg.chunk_size)
    batches = [list(evaluation[i:i + cfg.chunk_size]) for i in starts]
    refs = [None if reference is None else reference[i:i + cfg.chunk_size] for i in starts]

    def roll_back() -> None:
        remove_hook_layers(model)
        with torch.no_grad():
            for n, w in originals.items():
                model.get_submodule(n).weight.copy_(w)

    edit_seconds, scores = 0.0, []
    try:
        for batch_no, (batch, ref) in enumerate(zip(batches, refs), start=1):
            start = time.perf_counter()
            apply(model, tok, to_requests(batch), hp, return_orig_weights=False, keep_original_weight=False)
            edit_seconds += time.perf_counter() - start
            if probe is not None:
                probe(batch_no)
            if cfg.protocol == "single-round":
                scores.append((len(batch), _score(cfg, model, tok, batch, ref)))
                roll_back()
        if cfg.protocol != "single-round":
            scores.append((len(evaluation), _score(cfg, model, tok, evaluation, reference, cfg.progress)))
    finally:
        roll_back()
    metrics = {k: _weighted([(n, m[k]) for n, m in scores]) for k in METRIC_NAMES}
    return {"train_s_per_edit": None, "edit_s_per_edit": edit_seconds / len(evaluation), **metrics,
            "average": sum(metrics.values()) / 3, "batch_size": cfg.chunk_size}


def _through_easyedit(cfg: CompareConfig, hparams: Any, model, tok, evaluation: Sequence[EditRecord],
                      reference: Optional[list], probe: Optional[Probe] = None) -> dict[str, Any]:
    """Edit ``evaluation`` under the protocol with EasyEdit's ``BaseEditor``, score it our way, then roll back.

    Returns our metrics plus ``easyedit`` (EasyEdit's own per-record metric dicts, averaged). The
    model is restored bit-exactly afterwards, whatever happened (every parameter is snapshotted,
    COMEBA-HK hook state is removed).
    """
    from .comeba_hk.state import remove_hook_layers
    from .editing import WeightsSnapshot

    snapshot = WeightsSnapshot(model)
    for name, _ in model.named_parameters():
        snapshot.capture(name)

    def roll_back() -> None:
        remove_hook_layers(model)
        snapshot.restore()

    chunks = [list(evaluation[i:i + cfg.chunk_size]) for i in range(0, len(evaluation), cfg.chunk_size)]
    scores, easyedit_metrics, seconds, mode = [], [], 0.0, ""
    try:
        if cfg.protocol == "single-round":
            for chunk in chunks:
                ref = None if reference is None else reference[len(easyedit_metrics):len(easyedit_metrics) + len(chunk)]
                run = run_through_editor(hparams, model, tok, chunk, cfg.chunk_size)
                seconds, mode = seconds + run.edit_seconds, run.mode
                easyedit_metrics.extend(run.metrics)
                scores.append((len(chunk), _score(cfg, model, tok, chunk, ref)))
                roll_back()
        else:
            step = cfg.general_every if probe is not None else len(chunks)
            for first in range(0, len(chunks), step):
                group = [record for chunk in chunks[first:first + step] for record in chunk]
                run = run_through_editor(hparams, model, tok, group, cfg.chunk_size)
                seconds, mode = seconds + run.edit_seconds, run.mode
                easyedit_metrics.extend(run.metrics)
                if probe is not None:
                    probe(min(first + step, len(chunks)))
            scores.append((len(evaluation), _score(cfg, model, tok, evaluation, reference, cfg.progress)))
    finally:
        roll_back()
    ours = {k: _weighted([(n, m[k]) for n, m in scores]) for k in METRIC_NAMES}
    return {**ours, "edit_s_per_edit": seconds / len(evaluation), "easyedit_mode": mode,
            "easyedit": summarise_metrics(easyedit_metrics)}


def _weighted(pairs: Sequence[tuple[int, Optional[float]]]) -> Optional[float]:
    pairs = [(n, v) for n, v in pairs if v is not None]
    return sum(n * v for n, v in pairs) / sum(n for n, _ in pairs) if pairs else None


def _builtin_row(cfg: CompareConfig, name: str, model, tok, evaluation: Sequence[EditRecord],
                 reference: Optional[list], probe: Optional[Probe] = None) -> dict[str, Any]:
    """An EasyEdit built-in method with EasyEdit's own YAML; a row that says why if it cannot run here."""
    try:
        hp = load_builtin_hparams(name, cfg.model, cfg.easyedit_hparams or builtin_hparams_dir())
        if all(hasattr(hp, f) for f in ("mom2_dataset", "mom2_n_samples", "stats_dir", "layers")):
            hp = dataclasses.replace(hp, stats_dir=str(cache_dir() / "easyedit_stats"))
            seed_covariance_from_text(hp, model, tok, local_text())
        row = _through_easyedit(cfg, hp, model, tok, evaluation, reference, probe)
    except (EasyEditUnavailable, FileNotFoundError) as exc:
        return {**dict.fromkeys(METRIC_NAMES), "train_s_per_edit": None, "edit_s_per_edit": None, "error": str(exc)}
    except Exception as exc:
        import traceback

        traceback.print_exc(file=sys.stderr)
        return {**dict.fromkeys(METRIC_NAMES), "train_s_per_edit": None, "edit_s_per_edit": None,
                "error": f"EasyEdit's {name} failed on this model: {type(exc).__name__}: {exc}"}
    if cfg.locate:
        row["average"] = sum(row[k] for k in METRIC_NAMES) / 3
    return {**row, "train_s_per_edit": None}


def _via_easyedit(cfg: CompareConfig, method: str, row: dict[str, Any], model, tok,
                  evaluation: Sequence[EditRecord], reference: Optional[list],
                  overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The plugin method again, end to end through ``BaseEditor``: EasyEdit's metrics and ours on that run."""
    hp = method_hparams(method, cfg.model, training=False)
    if not METHODS[method].needs_archive:
        hp = hp.replace(**(overrides or {}), batch_size=cfg.chunk_size)
    else:
        seq_file = hparams_dir() / method / f"{cfg.model}-seq.yaml"
        if cfg.protocol == "sequential" and seq_file.is_file():
            hp = load_hparams(seq_file)
        hp = hp.replace(**(overrides or {}), archive=row["archive"])
    try:
        result = _through_easyedit(cfg, hp, model, tok, evaluation, reference)
    except EasyEditUnavailable as exc:
        return {"easyedit_error": str(exc)}
    return {"easyedit": result["easyedit"], "easyedit_mode": result["easyedit_mode"],
            "via_easyedit": {k: result[k] for k in METRIC_NAMES}}


def _mark_complete(archive: Path, train_s_per_edit: float) -> None:
    meta_path = archive / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update({"complete": True, "train_s_per_edit": train_s_per_edit})
    write_json_atomic(meta_path, meta)


def _check_config(cfg: CompareConfig) -> None:
    """Every bad setting is reported before a model is loaded or a weight touched."""
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    if cfg.protocol == "batch" and cfg.num_seq != 1:
        raise ValueError("--protocol batch edits one batch: use --num-seq 1 (or --protocol sequential)")
    for entry in cfg.methods:
        name, overrides = method_overrides(entry)
        builtin, method = split_method(name)
        if builtin:
            if overrides:
                raise ValueError(f"--methods entry {entry!r}: overrides apply to plugin methods; edit the EasyEdit "
                                 "YAML under --easyedit-hparams instead")
            continue
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in --methods; use any of {', '.join(METHODS)} "
                             "or easyedit:<EasyEdit method>")
        if METHODS[method].needs_archive and cfg.locate:
            raise ValueError(f"{method} runs under the batch or sequential protocol, not {cfg.protocol!r}")
        if overrides:
            try:
                method_hparams(method, cfg.model, training=METHODS[method].needs_archive).replace(**overrides)
            except HyperParamsError as exc:
                raise ValueError(f"--methods entry {entry!r}: {exc}") from exc
    for field in ("general_every", "general_items", "general_tokens"):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "general_every" else 1):
            raise ValueError(f"--{field.replace('_', '-')} must be a {'non-negative' if field == 'general_every' else 'positive'} "
                             f"int, got {value!r}")
    if cfg.easyedit_hparams is not None and not Path(cfg.easyedit_hparams).is_dir():
        raise ValueError(f"--easyedit-hparams {cfg.easyedit_hparams} is not a folder; give EasyEdit's hparams/ "
                         "(or one laid out as METHOD/MODEL.yaml)")


def run_compare(cfg: CompareConfig, model: Optional[torch.nn.Module] = None, tok: Any = None) -> list[dict[str, Any]]:
    """Train/evaluate every method of ``cfg`` and return one row per method, after the unedited model's row.

    ``model``/``tok`` replace loading ``cfg.model`` (whose name still picks the hparams files).
    """
    _check_config(cfg)
    if cfg.locate:
        cfg = dataclasses.replace(cfg, num_seq=-(-cfg.n_edits // cfg.batch_size))
    train = load_records(cfg.train_data, cfg.dataset) if cfg.train_data else []
    names = [method_overrides(m)[0] for m in cfg.methods]
    needs_training = [m for m in names if not split_method(m)[0] and METHODS[m].needs_archive]
    if needs_training and not train:
        raise ValueError(f"{', '.join(needs_training)} need --train-data to train their hypernetworks")
    total = cfg.n_edits if cfg.locate else cfg.n_edits * cfg.num_seq
    evaluation = load_records(cfg.eval_data, cfg.dataset)[:total]
    if len(evaluation) < total:
        raise ValueError(f"{cfg.eval_data} has {len(evaluation)} usable records, fewer than n_edits * num_seq = {total}")
    if model is None:
        model, tok = load_model_and_tokenizer(cfg.model)
    base = {"model": cfg.model, "dataset": cfg.dataset, "protocol": cfg.protocol, "n_edits": cfg.n_edits,
            "num_seq": cfg.num_seq}
    if cfg.locate:
        base["batch_size"] = cfg.batch_size
    reference = predict_locality_reference(model, tok, list(evaluation)) if cfg.locate else None
    start = time.perf_counter()
    unedited = _score(cfg, model, tok, evaluation, reference, cfg.progress)
    rows = [{"method": "unedited", **base, **{k: unedited[k] for k in METRIC_NAMES}, "train_s_per_edit": None,
             "edit_s_per_edit": 0.0, "peak_rss_mb": peak_rss_mb(), "eval_seconds": time.perf_counter() - start,
             "scoring": unedited["scoring"]}]
    if cfg.locate:
        rows[0]["average"] = sum(unedited[k] for k in METRIC_NAMES) / 3
    if cfg.general_every:
        rows[0]["general"] = [{"num_seq": 0, **_general(cfg, model, tok)}]
    for entry in cfg.methods:
        name, overrides = method_overrides(entry)
        builtin, method = split_method(name)
        points: list[dict[str, Any]] = []
        probe = _general_probe(cfg, model, tok, points)
        if builtin:
            result = _builtin_row(cfg, method, model, tok, evaluation, reference, probe)
        elif not METHODS[method].needs_archive:
            result = _locate_row(cfg, method, model, tok, evaluation, reference, probe, overrides)
        else:
            result = _hypernet_row(cfg, method, model, tok, train, evaluation, probe, overrides)
        if overrides:
            result["overrides"] = overrides
        if cfg.via_easyedit and not builtin:
            result.update(_via_easyedit(cfg, method, result, model, tok, evaluation, reference, overrides))
        if points:
            result["general"] = points
        rows.append({"method": entry, **base, **result, "peak_rss_mb": peak_rss_mb(), "scoring": unedited["scoring"]})
        torch.manual_seed(0)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a fixed-width table with metrics in percent; EasyEdit's own metrics and errors follow it."""
    avg = any("average" in r for r in rows)
    ee = any("easyedit" in r for r in rows)
    head = (["method", "ES %", "GS %", "LS %"] + (["avg %"] if avg else [])
            + (["EasyEdit ES/GS/LS %"] if ee else []) + ["train s/edit", "edit s/edit", "peak RSS MB"])
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    secs = lambda v: "-" if v is None else f"{v:.3f}"
    lines = []
    for r in rows:
        theirs = r.get("easyedit")
        lines.append([r["method"], pct(r["efficacy"]), pct(r["generalization"]), pct(r["specificity"])]
                     + ([pct(r.get("average"))] if avg else [])
                     + (["/".join(pct(theirs[k]) for k in METRIC_NAMES) if theirs else "-"] if ee else [])
                     + [secs(r.get("train_s_per_edit")), secs(r.get("edit_s_per_edit")), f"{r['peak_rss_mb']:.0f}"])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    notes = [f"{r['method']}: {r[key]}" for r in rows for key in ("error", "easyedit_error") if r.get(key)]
    notes += [f"{r['method']}: EasyEdit ran it with {r['easyedit_mode']}" for r in rows if r.get("easyedit_mode")]
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines] + notes)


def format_general(rows: Sequence[dict[str, Any]]) -> str:
    """General capability (GLUE-style accuracy %, perplexity) of the unedited model and after each probed batch."""
    points = [(r["method"], p) for r in rows for p in r.get("general", [])]
    if not points:
        return ""
    tasks = list(points[0][1]["glue"])
    head = ["method", "after batches"] + [t.upper() + " %" for t in tasks] + ["perplexity"]
    lines = [[m, str(p["num_seq"])] + [f"{100 * p['glue'][t]:.1f}" for t in tasks]
             + ["-" if p["perplexity"] is None else f"{p['perplexity']:.2f}"] for m, p in points]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The run as one PNG: curves when rows carry them (``--curve-every``), else bars per method and metric."""
    if any(r.get("curve") for r in rows):
        return plot_curves(rows, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get("efficacy") is not None]
    if not scored:
        raise ValueError("no scored rows to plot")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(scored) + 2), 4))
    width = 0.8 / len(METRIC_NAMES)
    for j, metric in enumerate(METRIC_NAMES):
        xs = [i + (j - 1) * width for i in range(len(scored))]
        ax.bar(xs, [100 * (r[metric] or 0.0) for r in scored], width, label=metric)
    ax.set_xticks(range(len(scored)), [r["method"] for r in scored], rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    first = scored[0]
    ax.set_title(f"{first['model']} · {first['dataset']} · {first['protocol']} · {first['n_edits']} edits"
                 f"{' × ' + str(first['num_seq']) if first['protocol'] == 'sequential' else ''}")
    fig.tight_layout()
    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One figure: efficacy, generalization and specificity against edited sequences, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r.get("curve")]
    if not curves:
        raise ValueError("no curves to plot: run the sequential protocol with --curve-every K")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharex=True)
    for ax, metric, label in zip(axes, ("efficacy", "generalization", "specificity"),
                                 ("efficacy (ES)", "generalization (GS)", "specificity (LS)")):
        for r in curves:
            xs = [p["num_seq"] for p in r["curve"]]
            ax.plot(xs, [100 * p[metric] for p in r["curve"]], marker="o", label=r["method"])
        ax.set_title(label)
        ax.set_xlabel("edit batches applied (sequences)")
        ax.set_ylabel(f"{metric} of all facts edited so far (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    first = curves[0]
    fig.suptitle(f"{first['model']} · {first['dataset']} · {first['n_edits']} edits per batch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path
