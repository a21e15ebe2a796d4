"""Running ``smedit compare``: the unedited row, then one runner per method on one shared :class:`RunContext`.

Each method is trained (or its archive reused) on the same training records, edits the same
evaluation records and is scored on the final model; the model is rolled back after each method.
``easyedit:<METHOD>`` entries run EasyEdit's own methods through its ``BaseEditor``, and
``via_easyedit`` also runs the plugin's methods through ``BaseEditor`` so EasyEdit's metric dicts
can be checked against ours.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TypedDict

from torch import nn
from tqdm.auto import tqdm

from ..records import EditRecord, load_records
from ..easyedit_runs import (EasyEditUnavailable, load_builtin_hparams, run_through_editor, seed_covariance_from_text,
                             summarise_metrics)
from ..editing import WeightsSnapshot
from ..evaluation import evaluate_records, predict_locality_reference
from ..fileio import cache_dir
from ..hypernet.distributed import SINGLE, RowReduce, launched_world
from ..methods import METHODS
from .config import (AVERAGED_METRICS, METRIC_NAMES, CompareConfig, MethodEntry, builtin_hparams_dir, check_config,
                     method_hparams, method_hparams_for)

if TYPE_CHECKING:
    from ..hypernet.hparams import HypernetHyperParams
    from ..hypernet.training import TrainedArchive

Probe = Callable[[int], None]


class MethodRow(TypedDict, total=False):
    """What a runner returns for one method; ``run_compare`` adds the run's settings and ``peak_rss_mb``."""

    efficacy: Optional[float]
    generalization: Optional[float]
    specificity: Optional[float]
    portability: Optional[float]
    average: float
    train_s_per_edit: Optional[float]
    edit_s_per_edit: Optional[float]
    batch_size: int
    archive: str
    curve: list[dict[str, Any]]
    error: str
    easyedit: dict[str, Any]
    easyedit_mode: str
    easyedit_error: str
    via_easyedit: dict[str, Optional[float]]


@dataclasses.dataclass
class RunContext:
    """Everything the runners of one compare run share: settings, model, records, locality reference."""

    cfg: CompareConfig
    model: nn.Module
    tok: Any
    train: Sequence[EditRecord]
    evaluation: Sequence[EditRecord]
    reference: Optional[list]

    def score(self, records: Sequence[EditRecord], reference: Optional[list], progress: bool = False) -> dict[str, Any]:
        """The protocol's metrics: the SMEdit paper's for batch/sequential, the COMEBA-HK paper's otherwise."""
        if self.cfg.locate:
            return evaluate_records(self.model, self.tok, list(records), dataset=self.cfg.dataset,
                                    locality="agreement", reference=reference, scoring="accuracy", progress=progress)
        return evaluate_records(self.model, self.tok, list(records), dataset=self.cfg.dataset, progress=progress)

    def edit_bar(self, label: str) -> tqdm:
        """The progress bar of a method's edit loop, counted in edits (closed by the caller's ``with``)."""
        return tqdm(total=len(self.evaluation), desc=f"editing {label}", unit="edit", disable=not self.cfg.progress)

    def general(self) -> dict[str, Any]:
        """GLUE-style accuracy and perplexity of the model as it is now."""
        from ..general import general_report

        cfg = self.cfg
        report = general_report(self.model, self.tok, n_items=cfg.general_items, ppl_tokens=cfg.general_tokens,
                                progress=cfg.progress)
        return {"glue": report["glue"], "perplexity": report["perplexity"], "seconds": report["seconds"]}

    def general_probe(self, points: list[dict[str, Any]]) -> Optional[Probe]:
        """``probe(batch_no)``: the general-capability report after every ``general_every``-th and the last batch."""
        if not self.cfg.general_every:
            return None

        def probe(batch_no: int) -> None:
            if batch_no % self.cfg.general_every == 0 or batch_no == self.cfg.num_seq:
                points.append({"num_seq": batch_no, **self.general()})
        return probe


def local_text() -> Path:
    """The bundled WikiText-2 text that stands in for EasyEdit's covariance corpus download."""
    from ..comeba_hk.covariance import WIKITEXT2, corpus_path

    return corpus_path(WIKITEXT2)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _weighted(pairs: Sequence[tuple[int, Optional[float]]]) -> Optional[float]:
    pairs = [(n, v) for n, v in pairs if v is not None]
    return sum(n * v for n, v in pairs) / sum(n for n, _ in pairs) if pairs else None


def _average(metrics: dict[str, Any]) -> float:
    """The COMEBA-HK paper's average of reliability, generality and locality."""
    return sum(metrics[k] for k in AVERAGED_METRICS) / len(AVERAGED_METRICS)


def _train_hparams(cfg: CompareConfig, entry: MethodEntry) -> "HypernetHyperParams":
    """The TRAINING hparams of a hypernetwork entry under the run's protocol: one budget for every method."""
    train_hp = method_hparams_for(entry.method, cfg.model, training=True, sequential=cfg.protocol == "sequential")
    return train_hp.replace(**entry.overrides, n_edits=cfg.n_edits, num_seq=cfg.num_seq, val_n_edits=cfg.n_edits,
                            max_steps=-1)


def train_entry(cfg: CompareConfig, model: nn.Module, tok: Any, train: Sequence[EditRecord],
                train_hp: "HypernetHyperParams", reduce: RowReduce = SINGLE) -> "TrainedArchive":
    """Train (or reuse) the archive of ``train_hp`` (:func:`_train_hparams`); under a launcher every rank
    trains its share."""
    from ..hypernet.training import train_or_reuse

    return train_or_reuse(model, tok, train_hp, train, train_data=cfg.train_data,
                          model_key=cfg.model, dataset=cfg.dataset, root=cfg.archive_root or (cache_dir() / "archives"),
                          label=cfg.protocol, retrain=cfg.retrain, progress=cfg.progress and reduce.is_first,
                          reduce=reduce)


def hypernet_row(ctx: RunContext, entry: MethodEntry, probe: Optional[Probe]) -> MethodRow:
    """A hypernetwork method: train or reuse its archive, edit the batches (they accumulate), score, roll back."""
    from ..hypernet.archive import load_archive
    from ..hypernet.training import edit_and_evaluate

    cfg = ctx.cfg
    train_hp = _train_hparams(cfg, entry)
    trained = train_entry(cfg, ctx.model, ctx.tok, ctx.train, train_hp)
    editor, _ = load_archive(trained.path, ctx.model, train_hp)
    with ctx.edit_bar(entry.text) as bar:
        metrics = edit_and_evaluate(ctx.model, ctx.tok, editor, list(ctx.evaluation), n_edits=cfg.n_edits,
                                    dataset=cfg.dataset, curve_every=cfg.curve_every, progress=cfg.progress,
                                    after_batch=probe, bar=bar)
    row = MethodRow(train_s_per_edit=trained.train_s_per_edit,
                    edit_s_per_edit=metrics["edit_seconds"] / len(ctx.evaluation), archive=str(trained.path),
                    **{k: metrics[k] for k in METRIC_NAMES})
    if "curve" in metrics:
        row["curve"] = metrics["curve"]
    return row


def locate_row(ctx: RunContext, entry: MethodEntry, probe: Optional[Probe]) -> MethodRow:
    """COMEBA-HK / MEMIT-C: consecutive batches that accumulate, or single rounds rolled back after each batch.

    Under the batch and sequential protocols the same code edits ``num_seq`` batches of ``n_edits``
    (one step per batch), scored like the hypernetwork methods beside it. Metrics follow the
    COMEBA-HK paper: reliability / generality as teacher-forced token accuracy and locality as
    agreement with the unedited model's predictions, plus their ``average``.
    """
    from ..comeba_hk.runner import LocateEditRun

    cfg, evaluation, reference = ctx.cfg, ctx.evaluation, ctx.reference
    hp = method_hparams(entry.method, cfg.model, training=False).replace(**entry.overrides, batch_size=cfg.chunk_size)
    run = LocateEditRun(ctx.model, ctx.tok, hp)
    starts = range(0, len(evaluation), cfg.chunk_size)
    edit_seconds, scores = 0.0, []
    try:
        with ctx.edit_bar(entry.text) as bar:
            for batch_no, i in enumerate(starts, start=1):
                batch = list(evaluation[i:i + cfg.chunk_size])
                start = time.perf_counter()
                run.edit(batch)
                edit_seconds += time.perf_counter() - start
                bar.update(len(batch))
                if probe is not None:
                    probe(batch_no)
                if cfg.protocol == "single-round":
                    ref = None if reference is None else reference[i:i + cfg.chunk_size]
                    scores.append((len(batch), ctx.score(batch, ref)))
                    run.roll_back()
        if cfg.protocol != "single-round":
            scores.append((len(evaluation), ctx.score(evaluation, reference, cfg.progress)))
    finally:
        run.roll_back()
    metrics = {k: _weighted([(n, m[k]) for n, m in scores]) for k in METRIC_NAMES}
    return MethodRow(train_s_per_edit=None, edit_s_per_edit=edit_seconds / len(evaluation), **metrics,
                     average=_average(metrics), batch_size=cfg.chunk_size)


def _through_easyedit(ctx: RunContext, label: str, hparams: Any, probe: Optional[Probe] = None) -> dict[str, Any]:
    """Edit the evaluation records under the protocol with EasyEdit's ``BaseEditor``, score them our way, roll back.

    Returns our metrics plus ``easyedit`` (EasyEdit's own per-record metric dicts, averaged). The
    model is restored bit-exactly afterwards, whatever happened (every parameter is snapshotted,
    COMEBA-HK hook state is removed).
    """
    from ..comeba_hk.runner import roll_back

    cfg, model, tok, evaluation, reference = ctx.cfg, ctx.model, ctx.tok, ctx.evaluation, ctx.reference
    snapshot = WeightsSnapshot(model)
    for name, _ in model.named_parameters():
        snapshot.capture(name)
    chunks = [list(evaluation[i:i + cfg.chunk_size]) for i in range(0, len(evaluation), cfg.chunk_size)]
    scores, easyedit_metrics, seconds, mode = [], [], 0.0, ""
    try:
        with ctx.edit_bar(label) as bar:
            if cfg.protocol == "single-round":
                for chunk in chunks:
                    done = len(easyedit_metrics)
                    ref = None if reference is None else reference[done:done + len(chunk)]
                    run = run_through_editor(hparams, model, tok, chunk, cfg.chunk_size, bar=bar)
                    seconds, mode = seconds + run.edit_seconds, run.mode
                    easyedit_metrics.extend(run.metrics)
                    scores.append((len(chunk), ctx.score(chunk, ref)))
                    roll_back(model, snapshot)
            else:
                step = cfg.general_every if probe is not None else len(chunks)
                for first in range(0, len(chunks), step):
                    group = [record for chunk in chunks[first:first + step] for record in chunk]
                    run = run_through_editor(hparams, model, tok, group, cfg.chunk_size, bar=bar)
                    seconds, mode = seconds + run.edit_seconds, run.mode
                    easyedit_metrics.extend(run.metrics)
                    if probe is not None:
                        probe(min(first + step, len(chunks)))
        if cfg.protocol != "single-round":
            scores.append((len(evaluation), ctx.score(evaluation, reference, cfg.progress)))
    finally:
        roll_back(model, snapshot)
    ours = {k: _weighted([(n, m[k]) for n, m in scores]) for k in METRIC_NAMES}
    return {**ours, "edit_s_per_edit": seconds / len(evaluation), "easyedit_mode": mode,
            "easyedit": summarise_metrics(easyedit_metrics)}


def builtin_row(ctx: RunContext, entry: MethodEntry, probe: Optional[Probe]) -> MethodRow:
    """An EasyEdit built-in method with EasyEdit's own YAML; a row that says why if it cannot run here."""
    cfg = ctx.cfg
    try:
        hp = load_builtin_hparams(entry.method, cfg.model, cfg.easyedit_hparams or builtin_hparams_dir())
        if all(hasattr(hp, f) for f in ("mom2_dataset", "mom2_n_samples", "stats_dir", "layers")):
            hp = dataclasses.replace(hp, stats_dir=str(cache_dir() / "easyedit_stats"))
            seed_covariance_from_text(hp, ctx.model, ctx.tok, local_text())
        row = _through_easyedit(ctx, entry.text, hp, probe)
    except (EasyEditUnavailable, FileNotFoundError) as exc:
        return MethodRow(**dict.fromkeys(METRIC_NAMES), train_s_per_edit=None, edit_s_per_edit=None, error=str(exc))
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        return MethodRow(**dict.fromkeys(METRIC_NAMES), train_s_per_edit=None, edit_s_per_edit=None,
                         error=f"EasyEdit's {entry.method} failed on this model: {type(exc).__name__}: {exc}")
    if cfg.locate:
        row["average"] = _average(row)
    return MethodRow(**row, train_s_per_edit=None)


def via_easyedit(ctx: RunContext, entry: MethodEntry, row: MethodRow) -> MethodRow:
    """The plugin method again, end to end through ``BaseEditor``: EasyEdit's metrics and ours on that run."""
    cfg = ctx.cfg
    if not METHODS[entry.method].needs_archive:
        hp = method_hparams(entry.method, cfg.model, training=False).replace(**entry.overrides,
                                                                             batch_size=cfg.chunk_size)
    else:
        hp = method_hparams_for(entry.method, cfg.model, training=False, sequential=cfg.protocol == "sequential")
        hp = hp.replace(**entry.overrides, archive=row["archive"])
    try:
        result = _through_easyedit(ctx, f"{entry.text} through BaseEditor", hp)
    except EasyEditUnavailable as exc:
        return MethodRow(easyedit_error=str(exc))
    return MethodRow(easyedit=result["easyedit"], easyedit_mode=result["easyedit_mode"],
                     via_easyedit={k: result[k] for k in METRIC_NAMES})


def _runner(entry: MethodEntry) -> Callable[[RunContext, MethodEntry, Optional[Probe]], MethodRow]:
    if entry.builtin:
        return builtin_row
    return hypernet_row if METHODS[entry.method].needs_archive else locate_row


def train_distributed(cfg: CompareConfig, entries: Sequence[MethodEntry], train: Sequence[EditRecord],
                      model: Optional[nn.Module], tok: Any) -> tuple[bool, nn.Module, Any]:
    """Under ``torchrun`` / ``accelerate launch``: every rank trains the archives of the run together.

    Returns ``(is_first, model, tok)``. Afterwards the ranks leave the process group; rank 0 alone goes
    on to edit and score (it reuses the archives just written), the others have nothing left to do.
    """
    from ..hypernet.distributed import init_from_environment, shutdown

    reduce, device = init_from_environment()
    try:
        if model is None:
            from ..models import load_model_and_tokenizer

            model, tok = load_model_and_tokenizer(cfg.model, device=device)
        for entry in entries:
            if not entry.builtin and METHODS[entry.method].needs_archive:
                train_entry(cfg, model, tok, train, _train_hparams(cfg, entry), reduce)
        reduce.barrier()
    finally:
        shutdown(reduce)
    return reduce.is_first, model, tok


def run_compare(cfg: CompareConfig, model: Optional[nn.Module] = None, tok: Any = None) -> list[dict[str, Any]]:
    """Train/evaluate every method of ``cfg`` and return one row per method, after the unedited model's row.

    ``model``/``tok`` replace loading ``cfg.model`` (whose name still picks the hparams files). Under a
    data-parallel launcher the archives are trained by all ranks first; rank 0 returns the rows, every
    other rank an empty list.
    """
    check_config(cfg)
    if cfg.locate:
        cfg = dataclasses.replace(cfg, num_seq=-(-cfg.n_edits // cfg.batch_size))
    entries = [MethodEntry.parse(text) for text in cfg.methods]
    train = load_records(cfg.train_data, cfg.dataset) if cfg.train_data else []
    needs_training = [e.method for e in entries if not e.builtin and METHODS[e.method].needs_archive]
    if needs_training and not train:
        raise ValueError(f"{', '.join(needs_training)} need --train-data to train their hypernetworks")
    total = cfg.n_edits if cfg.locate else cfg.n_edits * cfg.num_seq
    evaluation = load_records(cfg.eval_data, cfg.dataset)[:total]
    if len(evaluation) < total:
        raise ValueError(f"{cfg.eval_data} has {len(evaluation)} usable records, fewer than n_edits * num_seq = {total}")
    if launched_world()[1] > 1:
        is_first, model, tok = train_distributed(cfg, entries, train, model, tok)
        if not is_first:
            return []
        cfg = dataclasses.replace(cfg, retrain=False)  # the archives were trained just now
    if model is None:
        from ..models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(cfg.model)
    reference = predict_locality_reference(model, tok, list(evaluation), progress=cfg.progress) if cfg.locate else None
    ctx = RunContext(cfg, model, tok, train, evaluation, reference)
    base = {"model": cfg.model, "dataset": cfg.dataset, "protocol": cfg.protocol, "n_edits": cfg.n_edits,
            "num_seq": cfg.num_seq}
    if cfg.locate:
        base["batch_size"] = cfg.batch_size
    start = time.perf_counter()
    unedited = ctx.score(evaluation, reference, cfg.progress)
    rows = [{"method": "unedited", **base, **{k: unedited[k] for k in METRIC_NAMES}, "train_s_per_edit": None,
             "edit_s_per_edit": 0.0, "peak_rss_mb": peak_rss_mb(), "eval_seconds": time.perf_counter() - start,
             "scoring": unedited["scoring"]}]
    if cfg.locate:
        rows[0]["average"] = _average(unedited)
    if cfg.general_every:
        rows[0]["general"] = [{"num_seq": 0, **ctx.general()}]
    for entry in entries:
        points: list[dict[str, Any]] = []
        result: dict[str, Any] = dict(_runner(entry)(ctx, entry, ctx.general_probe(points)))
        if entry.overrides:
            result["overrides"] = entry.overrides
        if cfg.via_easyedit and not entry.builtin:
            result.update(via_easyedit(ctx, entry, result))
        if points:
            result["general"] = points
        rows.append({"method": entry.text, **base, **result, "peak_rss_mb": peak_rss_mb(),
                     "scoring": unedited["scoring"]})
    return rows
