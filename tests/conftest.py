"""Shared fixtures: the real SmolLM2 testbed, tiny real-depth models, and the project's real data files.

Data lives next to the repository (``../shared/data``), as in CI. The ``smollm2`` fixture is
session-scoped and shared: tests that change its weights must restore them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


class _DeprecationRecords(logging.Handler):
    """Collects what transformers logs (not warns) about deprecated arguments, e.g. ``past_key_values``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecated" in message.lower():
            self.messages.append(message)


#: Deprecated transformers calls inside EasyEdit's own source, not ours (its ``generate_fast`` and metrics pass
#: ``past_key_values``, its LoRA (through PEFT) enables gradient checkpointing): tolerated in the ``easyedit_head`` tests,
#: which run EasyEdit's methods; everywhere else they still fail.
EASYEDIT_DEPRECATIONS = ("`past_key_values`", "`gradient_checkpointing_enable`", "`is_gradient_checkpointing`")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("easyedit_head"):
            for api in EASYEDIT_DEPRECATIONS:
                item.add_marker(pytest.mark.filterwarnings(f"ignore:{api} is deprecated:FutureWarning"))


@pytest.fixture(autouse=True)
def no_transformers_deprecations(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which transformers logged a deprecation: the next release would break that call.

    FutureWarnings are errors already (setup.cfg); transformers reports some deprecations through
    its logger instead, once per process, so the first test that triggers one fails.
    """
    handler = _DeprecationRecords()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    tolerated = EASYEDIT_DEPRECATIONS if request.node.get_closest_marker("easyedit_head") else ()
    messages = [m for m in handler.messages if not any(api in m for api in tolerated)]
    assert not messages, f"transformers logged deprecations: {messages}"


def _data_file(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"shared data file {path} is not available")
    return path


@pytest.fixture(scope="session")
def zsre_train_path() -> Path:
    return _data_file("zsre/zsre_train.json")


@pytest.fixture(scope="session")
def zsre_eval_path() -> Path:
    return _data_file("zsre/zsre_eval.json")


@pytest.fixture(scope="session")
def counterfact_eval_path() -> Path:
    """Full ROME schema (``requested_rewrite``, paraphrase and neighbourhood prompts)."""
    return _data_file("counterfact/counterfact_eval.json")


@pytest.fixture(scope="session")
def counterfact_train_path() -> Path:
    """MEND/EasyEdit split schema (``prompt, target_new, ground_truth, ...``)."""
    return _data_file("counterfact/counterfact_train.json")


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """Real SmolLM2-135M-Instruct (fp32, CPU), converted from its GGUF once and then read from the cache."""
    from smedit_plugin.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny() -> Callable[..., tuple[Any, Any]]:
    """Factory ``tiny(arch="smollm2", n_layers=None, seed=0)`` -> a fresh random ``(model, tokenizer)``."""
    from smedit_plugin.testing import tiny_model

    def make(arch: str = "smollm2", n_layers: Optional[int] = None, seed: int = 0) -> tuple[Any, Any]:
        return tiny_model(arch, seed=seed, n_layers=n_layers)

    return make


@pytest.fixture()
def direct_call_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin "no EasyEdit loaded" for tests that call the apply functions directly, so an earlier test that
    imported the 2023 wheel (era A, where ``keep_original_weight=False`` returns ``{}``) cannot change them.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("direct_call_semantics")``."""
    from smedit_plugin import editing

    monkeypatch.setattr(editing, "detect_era", lambda **kwargs: None)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder for one test module's covariance statistics (COMEBA-HK / MEMIT-C layer stats)."""
    return str(tmp_path_factory.mktemp("comeba_stats"))


@pytest.fixture(scope="session")
def easyeditor() -> Any:
    """The installed EasyEdit (2023 wheel or GitHub source) imported the plugin's way, or skip the test."""
    import importlib.util

    if importlib.util.find_spec("easyeditor") is None:
        pytest.skip("no EasyEdit installed (pip install --no-deps easyeditor==0.0.1.dev0, see tests/easyedit_env.md)")
    from smedit_plugin import easyedit

    easyedit.install_transformers_shim()
    return easyedit.import_easyeditor(tolerate_missing_vision=True)
