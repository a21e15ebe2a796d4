"""Running ``smedit compare``: the unedited row, then one family runner per method through the one edit loop.

Every method is prepared by its family runner (trained, or its archive reused, on the same training
records), edits the same evaluation records under the declared protocol
(:func:`smedit_plugin.edit_loop.run_protocol`) and is rolled back before the next. ``easyedit:<METHOD>``
entries run EasyEdit's own methods through its ``BaseEditor``; ``via_easyedit`` also runs the plugin's
methods that way, so EasyEdit's metric dicts can be checked against ours. Nothing here knows a family.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence, TypedDict

from torch import nn

from ..distributed import launched_world
from ..edit_loop import run_protocol, score
from ..errors import MethodUnavailable
from ..evaluation import predict_locality_reference
from ..families import Bench, FamilyRunner, MethodChoice, Training
from ..memory import peak_rss_mb
from ..fileio import cache_dir
from ..hparams import load_method_hparams
from ..methods import EASYEDIT_FAMILY
from ..records import EditRecord, load_records
from ..registry import make_easyedit_apply, register
from ..resolve import family_runner, load_object
from .config import AVERAGED_METRICS, METRIC_NAMES, CompareConfig, MethodEntry, check_config

Probe = Callable[[int], None]


class MethodRow(TypedDict, total=False):
    """What one method adds to its row; ``run_compare`` adds the run's settings and ``peak_rss_mb``."""

    efficacy: Optional[float]
    generalization: Optional[float]
    specificity: Optional[float]
    portability: Optional[float]
    average: float
    train_s_per_edit: Optional[float]
    edit_s_per_edit: Optional[float]
    archive: str
    curve: list[dict[str, Any]]
    error: str
    easyedit: dict[str, Any]
    easyedit_mode: str
    easyedit_error: str
    via_easyedit: dict[str, Optional[float]]


@dataclasses.dataclass
class RunContext:
    """Everything the methods of one compare run share: settings, bench, records, locality reference."""

    cfg: CompareConfig
    bench: Bench
    train: Sequence[EditRecord]
    evaluation: Sequence[EditRecord]
    reference: Optional[list]

    def general(self) -> dict[str, Any]:
        """GLUE-style accuracy and perplexity of the model as it is now."""
        from ..general import general_report

        cfg = self.cfg
        report = general_report(self.bench.model, self.bench.tok, n_items=cfg.general_items,
                                ppl_tokens=cfg.general_tokens, progress=cfg.progress)
        return {"glue": report["glue"], "perplexity": report["perplexity"], "seconds": report["seconds"]}

    def general_probe(self, points: list[dict[str, Any]]) -> Optional[Probe]:
        """``probe(chunks_done)``: the general-capability report after every ``general_every``-th and the last chunk."""
        if not self.cfg.general_every:
            return None

        def probe(done: int) -> None:
            if done % self.cfg.general_every == 0 or done == self.cfg.chunks:
                points.append({"num_seq": done, **self.general()})
        return probe

    def training(self, reduce: Any = None) -> Training:
        """The training records and archive cache of this run, shaped like the protocol's chunks."""
        cfg = self.cfg
        total, chunk = cfg.sizes
        return Training(self.train, cfg.train_data, cfg.archive_root or (cache_dir() / "archives"), cfg.protocol,
                        retrain=cfg.retrain, shape=(chunk, cfg.chunks if cfg.declared.accumulate else 1), reduce=reduce)


def _average(metrics: dict[str, Any]) -> float:
    """The COMEBA-HK paper's average of reliability, generality and locality."""
    return sum(metrics[k] for k in AVERAGED_METRICS) / len(AVERAGED_METRICS)


def runner_class(entry: MethodEntry) -> type[FamilyRunner]:
    """The family runner of an entry: EasyEdit's for ``easyedit:<METHOD>``, else the one the method table names."""
    return load_object(EASYEDIT_FAMILY) if entry.builtin else family_runner(entry.method)


def method_choice(cfg: CompareConfig, entry: MethodEntry) -> MethodChoice:
    """The entry with its YAMLs (the protocol's variant where one ships), overrides applied, and its apply function."""
    if entry.builtin:
        return MethodChoice(entry.text, entry.method)
    variant, chunk = cfg.declared.variant, cfg.sizes[1]
    hparams = load_method_hparams(entry.method, cfg.model, variant=variant).replace(**entry.overrides, batch_size=chunk)
    train_hparams = None
    if runner_class(entry).trains:
        train_hparams = load_method_hparams(entry.method, cfg.model, training=True, variant=variant)
        train_hparams = train_hparams.replace(**entry.overrides)
    return MethodChoice(entry.text, entry.method, hparams, train_hparams, make_easyedit_apply(entry.method))


def load_model(cfg: CompareConfig, device: Any = None) -> tuple[nn.Module, Any]:
    """The run's model as its first plugin method's YAML says (``model_name``, ``model_dtype``, ``model_parallel``:
    ``--model llama3-8b`` loads Meta-Llama-3-8B in bf16); with EasyEdit's methods only, ``--model`` itself."""
    from ..models import load_model_and_tokenizer, load_model_for

    for entry in map(MethodEntry.parse, cfg.methods):
        if not entry.builtin:
            hp = load_method_hparams(entry.method, cfg.model, variant=cfg.declared.variant)
            return load_model_for(hp if device is None else hp.replace(device=str(device)))
    return load_model_and_tokenizer(cfg.model, device=device)


def run_method(ctx: RunContext, runner: FamilyRunner, label: str, probe: Optional[Probe] = None) -> MethodRow:
    """Edit the evaluation records with a prepared runner under the run's protocol, score, roll back."""
    cfg = ctx.cfg
    result = run_protocol(runner, cfg.declared, ctx.evaluation, chunk=cfg.sizes[1], dataset=cfg.dataset,
                          reference=ctx.reference, curve_every=cfg.curve_every, checkpoints=cfg.checkpoints,
                          after_chunk=None if probe is None else (lambda state: probe(state.chunks_done)),
                          progress=cfg.progress, label=label)
    row = MethodRow(**{k: result.metrics[k] for k in METRIC_NAMES},
                    edit_s_per_edit=result.edit_seconds / len(ctx.evaluation), **runner.report())
    if result.curve:
        row["curve"] = result.curve
    if cfg.declared.scoring == "locate":
        row["average"] = _average(row)
    return row


def method_row(ctx: RunContext, entry: MethodEntry, probe: Optional[Probe]) -> MethodRow:
    """One method: prepared by its family runner, edited and scored; a row that says why if it cannot run here
    (or, for EasyEdit's own methods, why it failed on this model)."""
    cls = runner_class(entry)
    try:
        runner = cls(ctx.bench, method_choice(ctx.cfg, entry))
        prepared = runner.prepare(ctx.training() if cls.trains else None)
        return MethodRow(**{"train_s_per_edit": None, **prepared, **run_method(ctx, runner, entry.text, probe)})
    except MethodUnavailable as exc:
        return MethodRow(**dict.fromkeys(METRIC_NAMES), train_s_per_edit=None, edit_s_per_edit=None, error=str(exc))
    except Exception as exc:
        if not entry.builtin:
            raise
        traceback.print_exc(file=sys.stderr)
        return MethodRow(**dict.fromkeys(METRIC_NAMES), train_s_per_edit=None, edit_s_per_edit=None,
                         error=f"EasyEdit's {entry.method} failed on this model: {type(exc).__name__}: {exc}")


def via_easyedit(ctx: RunContext, entry: MethodEntry, row: MethodRow) -> MethodRow:
    """The plugin method again, end to end through ``BaseEditor``: EasyEdit's metrics and ours on that run."""
    choice = method_choice(ctx.cfg, entry)
    if row.get("archive"):
        choice = dataclasses.replace(choice, hparams=choice.hparams.replace(archive=row["archive"]))
    runner = load_object(EASYEDIT_FAMILY)(ctx.bench, choice)
    try:
        runner.prepare()  # imports EasyEdit (or says why it cannot run here)
        register([entry.method])
        result = run_method(ctx, runner, f"{entry.text} through BaseEditor")
    except MethodUnavailable as exc:
        return MethodRow(easyedit_error=str(exc))
    return MethodRow(easyedit=result["easyedit"], easyedit_mode=result["easyedit_mode"],
                     via_easyedit={k: result[k] for k in METRIC_NAMES})


def train_distributed(cfg: CompareConfig, entries: Sequence[MethodEntry], train: Sequence[EditRecord],
                      model: Optional[nn.Module], tok: Any) -> tuple[bool, nn.Module, Any]:
    """Under ``torchrun`` / ``accelerate launch``: every rank prepares (trains) the methods that train, together.

    Returns ``(is_first, model, tok)``. Afterwards the ranks leave the process group; rank 0 alone goes
    on to edit and score (it reuses the archives just written), the others have nothing left to do.
    """
    from ..distributed import init_from_environment, shutdown

    reduce, device = init_from_environment()
    try:
        if model is None:
            model, tok = load_model(cfg, device)
        ctx = RunContext(cfg, Bench(model, tok, cfg.model, cfg.dataset, cfg.progress), train, [], None)
        for entry in entries:
            cls = runner_class(entry)
            if cls.trains:
                cls(ctx.bench, method_choice(cfg, entry)).prepare(ctx.training(reduce))
        reduce.barrier()
    finally:
        shutdown(reduce)
    return reduce.is_first, model, tok


def run_compare(cfg: CompareConfig, model: Optional[nn.Module] = None, tok: Any = None) -> list[dict[str, Any]]:
    """Prepare, edit with and score every method of ``cfg``; one row per method, after the unedited model's row.

    ``model``/``tok`` replace loading ``cfg.model`` (whose name still picks the hparams files). Under a
    data-parallel launcher the methods that train are trained by all ranks first; rank 0 returns the
    rows, every other rank an empty list.
    """
    check_config(cfg)
    entries = [MethodEntry.parse(text) for text in cfg.methods]
    training = [e.text for e in entries if runner_class(e).trains]
    train = load_records(cfg.train_data, cfg.dataset) if cfg.train_data else []
    if training and not train:
        raise ValueError(f"{', '.join(training)} train first: give --train-data")
    total = cfg.sizes[0]
    evaluation = load_records(cfg.eval_data, cfg.dataset)[:total]
    if len(evaluation) < total:
        raise ValueError(f"{cfg.eval_data} has {len(evaluation)} usable records, fewer than the {total} the protocol "
                         "edits")
    if launched_world()[1] > 1:
        is_first, model, tok = train_distributed(cfg, entries, train, model, tok)
        if not is_first:
            return []
        cfg = dataclasses.replace(cfg, retrain=False)  # the archives were trained just now
    if model is None:
        model, tok = load_model(cfg)
    declared = cfg.declared
    reference = (predict_locality_reference(model, tok, list(evaluation), progress=cfg.progress)
                 if declared.agreement_locality else None)
    ctx = RunContext(cfg, Bench(model, tok, cfg.model, cfg.dataset, cfg.progress, cfg.easyedit_hparams), train,
                     evaluation, reference)
    base = {"model": cfg.model, "dataset": cfg.dataset, "protocol": cfg.protocol, "n_edits": cfg.n_edits,
            "num_seq": cfg.chunks, "batch_size": cfg.sizes[1]}
    start = time.perf_counter()
    unedited = score(model, tok, evaluation, declared, cfg.dataset, reference, cfg.progress)
    rows = [{"method": "unedited", **base, **{k: unedited[k] for k in METRIC_NAMES}, "train_s_per_edit": None,
             "edit_s_per_edit": 0.0, "peak_rss_mb": peak_rss_mb(), "eval_seconds": time.perf_counter() - start,
             "scoring": unedited["scoring"]}]
    if declared.scoring == "locate":
        rows[0]["average"] = _average(unedited)
    if cfg.general_every:
        rows[0]["general"] = [{"num_seq": 0, **ctx.general()}]
    for entry in entries:
        points: list[dict[str, Any]] = []
        result: dict[str, Any] = dict(method_row(ctx, entry, ctx.general_probe(points)))
        if entry.overrides:
            result["overrides"] = entry.overrides
        if cfg.via_easyedit and not entry.builtin:
            result.update(via_easyedit(ctx, entry, result))
        if points:
            result["general"] = points
        rows.append({"method": entry.text, **base, **result, "peak_rss_mb": peak_rss_mb(),
                     "scoring": unedited["scoring"]})
    return rows
