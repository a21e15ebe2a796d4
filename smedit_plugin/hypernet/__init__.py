"""Shared hyper-network machinery of MALMEN², RLEdit² and SMEdit (meta-editing spec §1, §2.1, §2.2, §8).

Where each formula lives: network and normaliser (§1.2) in ``network``, the ridge shift and its
backward (§1.4, §1.5) in ``solve``, the per-module predict/meta-gradient blocks and weight
orientation (§1.1) in ``shifts``, key/value-gradient caching (§1.3) in ``cache``, losses (§2) in ``losses`` (answer positions in :mod:`smedit_plugin.answers`).
"""
from .cache import ModuleCache, cache_keys_and_value_grads
from .losses import answer_cross_entropy, kl_locality, token_mean_cross_entropy
from .network import EPS_FP32, HyperNet, RunningMeanStd, build_hypernets, shape_key
from .shifts import (accumulate_meta_grad, add_param_shift_, from_in_out, module_shape, predict_param_shift,
                     to_in_out, weight_grad_in_out)
from .solve import RidgeSolve

__all__ = [
    "EPS_FP32", "HyperNet", "ModuleCache", "RidgeSolve", "RunningMeanStd", "accumulate_meta_grad",
    "add_param_shift_", "answer_cross_entropy", "build_hypernets", "cache_keys_and_value_grads", "from_in_out",
    "kl_locality",
    "module_shape", "predict_param_shift", "shape_key", "to_in_out", "token_mean_cross_entropy",
    "weight_grad_in_out",
]
