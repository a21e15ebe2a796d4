"""``smedit compare``: the same model, records and protocol for several methods, side by side.

:mod:`.config` holds the settings and the ``--methods`` mini-language, :mod:`.run` the runners
(one typed :class:`~.run.RunContext` in, one :class:`~.run.MethodRow` out), :mod:`.report` the
tables and plots.
"""
from .config import (AVERAGED_METRICS, LOCATE_PROTOCOLS, METRIC_NAMES, PROTOCOLS, ROW_FIELDS, CompareConfig,
                     MethodEntry, builtin_hparams_dir, hparams_dir, method_hparams, method_overrides, parse_methods)
from .report import format_general, format_table, plot_curves, plot_results
from .run import MethodRow, RunContext, local_text, peak_rss_mb, run_compare

__all__ = ["AVERAGED_METRICS", "LOCATE_PROTOCOLS", "METRIC_NAMES", "PROTOCOLS", "ROW_FIELDS", "CompareConfig",
           "MethodEntry", "MethodRow", "RunContext", "builtin_hparams_dir", "format_general", "format_table",
           "hparams_dir", "local_text", "method_hparams", "method_overrides", "parse_methods", "peak_rss_mb",
           "plot_curves", "plot_results", "run_compare"]
