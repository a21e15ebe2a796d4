"""Editing protocols as data: how the records are cut into chunks, whether edits accumulate, how they are scored.

One loop (:func:`smedit_plugin.edit_loop.run_protocol`) runs any protocol with any family runner; the
CLI's choices, ``smedit compare``'s checks and its report read these declarations. Adding a protocol is
one entry in :data:`PROTOCOLS` (``docs/architecture.md``, "Adding a protocol").
"""
from __future__ import annotations

import dataclasses

#: ``scoring`` values. ``meta``: the SMEdit/MALMEN/RLEdit papers' metrics (token accuracy on ZsRE, new-vs-true
#: log-probability on CounterFact, locality against the dataset answer). ``locate``: the COMEBA-HK paper's
#: (token accuracy everywhere, locality as agreement with the unedited model's predictions, and their average).
SCORINGS = ("meta", "locate")
#: ``chunk_option`` values: which CLI option sizes a chunk.
CHUNK_OPTIONS = ("n_edits", "batch_size")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One editing protocol.

    ``chunk_option="n_edits"``: chunks of ``--n-edits`` facts, ``--num-seq`` of them; ``"batch_size"``:
    ``--n-edits`` facts in all, in chunks of ``--batch-size``. ``accumulate``: edits stay in the model
    (scored together at the end and at curve points); otherwise each chunk is scored alone and rolled back.
    ``variant``: the YAML variant a method uses under this protocol when one ships (``smollm2-135m-seq.yaml``).
    ``one_chunk``: exactly one chunk (``--num-seq`` must be 1).
    """

    name: str
    help: str
    chunk_option: str
    accumulate: bool
    scoring: str
    variant: str = ""
    one_chunk: bool = False

    def __post_init__(self) -> None:
        if self.chunk_option not in CHUNK_OPTIONS:
            raise ValueError(f"protocol {self.name!r}: chunk_option must be one of {CHUNK_OPTIONS}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"protocol {self.name!r}: scoring must be one of {SCORINGS}")

    def sizes(self, n_edits: int, num_seq: int, batch_size: int) -> tuple[int, int]:
        """``(facts edited in all, facts per chunk)`` under this protocol's reading of the CLI options."""
        if self.chunk_option == "n_edits":
            return n_edits * num_seq, n_edits
        return n_edits, batch_size

    @property
    def agreement_locality(self) -> bool:
        """Whether locality is agreement with the unedited model (its predictions are taken before any edit)."""
        return self.scoring == "locate"


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("batch", "one batch of --n-edits facts", "n_edits", accumulate=True,
                 scoring="meta", one_chunk=True),
        Protocol("sequential", "--num-seq batches of --n-edits facts that accumulate", "n_edits",
                 accumulate=True, scoring="meta", variant="-seq"),
        Protocol("consecutive", "--n-edits facts in consecutive steps of --batch-size that accumulate",
                 "batch_size", accumulate=True, scoring="locate", variant="-seq"),
        Protocol("single-round", "--n-edits facts in rounds of --batch-size, each scored alone and rolled back",
                 "batch_size", accumulate=False, scoring="locate"),
    )
}


def protocol(name: str) -> Protocol:
    """The declaration of ``name``; unknown names raise with the list of known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}") from None
