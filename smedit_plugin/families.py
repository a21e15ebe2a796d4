"""The one interface of a method family: prepare, edit a chunk through the method's apply function, roll back.

The method table names each method's family runner (:data:`smedit_plugin.methods.METHODS`, ``family``);
EasyEdit's own methods have a runner too. ``smedit compare``, the demo, training validation and the
benchmarks drive every family through this interface and :func:`smedit_plugin.edit_loop.run_protocol`,
so adding a family needs no new branch anywhere else.
"""
from __future__ import annotations

import abc
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

from torch import nn

from .editing import WeightsSnapshot
from .records import EditRecord
from .requests import to_requests


@dataclasses.dataclass
class Bench:
    """What the runners of one run share: the model, the name its YAMLs are shipped under, the dataset."""

    model: nn.Module
    tok: Any
    model_key: str
    dataset: str
    progress: bool = True
    easyedit_hparams: Optional[Path] = None  # EasyEdit's own YAMLs (METHOD/MODEL.yaml) for easyedit:<METHOD>


@dataclasses.dataclass(frozen=True)
class MethodChoice:
    """One method to run, as its caller resolved it from the method table and the shipped YAMLs.

    ``label`` is what rows show (``SMEdit[reg_coef=0]``, ``easyedit:FT``). ``hparams``: the editing hparams,
    overrides applied (None: the family finds its own, e.g. EasyEdit's YAML). ``train_hparams``: the
    training hparams of a family that trains. ``apply``: the EasyEdit apply function every edit goes through.
    """

    label: str
    method: str
    hparams: Any = None
    train_hparams: Any = None
    apply: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class Training:
    """What a family that trains (``FamilyRunner.trains``) trains on, and where it keeps what it trained.

    ``shape``: ``(facts per chunk, chunks that accumulate)`` of the protocol it will edit under, so that it
    trains for that shape (RLEdit's protocol); None keeps the training YAML's own sizes.
    """

    records: Sequence[EditRecord]
    data_key: Union[Path, str, None]  # keys the archive: the training file (its bytes), or a string naming the records
    archive_root: Path
    label: str
    retrain: bool = False
    shape: Optional[tuple[int, int]] = None
    reduce: Any = None  # data-parallel ranks (smedit_plugin.distributed.RowReduce); None = one process


class FamilyRunner(abc.ABC):
    """Prepares one method on a model, edits chunks of records with it, and rolls the model back.

    Subclasses say what an edit can touch (:meth:`capture`), so that :meth:`roll_back` restores exactly
    that, bit for bit, however many chunks were edited; and how the method gets ready (:meth:`prepare`).
    :meth:`edit` goes through the method's EasyEdit apply function, as ``BaseEditor`` would call it.
    """

    #: Whether :meth:`prepare` trains (and so needs :class:`Training`).
    trains: ClassVar[bool] = False
    #: Whether :meth:`save_state` / :meth:`load_state` carry the edits made so far into another process, so that
    #: a long run killed at any moment continues where it saved (else it starts over). A class attribute, or a
    #: property where it depends on the method (EasyEdit's).
    resumable: bool = False

    def __init__(self, bench: Bench, choice: MethodChoice) -> None:
        self.bench, self.choice = bench, choice
        self.hparams = choice.hparams
        self.snapshot = WeightsSnapshot(bench.model)
        self._captured = False

    def prepare(self, training: Optional[Training] = None) -> dict[str, Any]:
        """Get ready to edit (train or reuse what it needs); returns fields for the result row."""
        return {}

    @abc.abstractmethod
    def capture(self, snapshot: WeightsSnapshot) -> None:
        """Capture into ``snapshot`` everything an edit may change (and register undo steps for the rest)."""

    def edit(self, records: Sequence[EditRecord]) -> float:
        """Edit ``records`` into the model (kept until :meth:`roll_back`); returns the seconds the edit took."""
        self._capture_once()
        start = time.perf_counter()
        self.choice.apply(self.bench.model, self.bench.tok, to_requests(list(records)), self.hparams,
                          return_orig_weights=False, keep_original_weight=False)
        return time.perf_counter() - start

    def roll_back(self) -> None:
        """Undo every edit since the first one, bit for bit."""
        self.snapshot.restore()

    def save_state(self, folder: Path) -> None:
        """Write the edits made so far into ``folder`` (atomically; the model is unchanged)."""
        raise NotImplementedError(f"{type(self).__name__} cannot save its edits; its runs start over")

    def load_state(self, folder: Path) -> None:
        """Put the edits saved by :meth:`save_state` into the (unedited) model; :meth:`roll_back` still undoes them."""
        raise NotImplementedError(f"{type(self).__name__} cannot load saved edits; its runs start over")

    def report(self) -> dict[str, Any]:
        """Extra fields for the result row (e.g. EasyEdit's own metrics); read after the edits."""
        return {}

    def _capture_once(self) -> None:
        if not self._captured:
            self.capture(self.snapshot)
            self._captured = True
