"""``smedit compare``: the same model, records and protocol for several methods, side by side.

:mod:`.config` holds the settings and the ``--methods`` mini-language, :mod:`.run` drives each method's family
runner through the one edit loop (:mod:`smedit_plugin.edit_loop`), :mod:`.report` the tables and plots.
"""
from .config import (AVERAGED_METRICS, METRIC_NAMES, ROW_FIELDS, CompareConfig, MethodEntry, method_overrides,
                     parse_methods)
from .report import format_general, format_table, plot_curves, plot_results
from ..memory import peak_rss_mb
from .run import MethodRow, RunContext, run_compare

__all__ = ["AVERAGED_METRICS", "METRIC_NAMES", "ROW_FIELDS", "CompareConfig", "MethodEntry", "MethodRow", "RunContext",
           "format_general", "format_table", "method_overrides", "parse_methods", "peak_rss_mb", "plot_curves",
           "plot_results", "run_compare"]
