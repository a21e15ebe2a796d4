"""COMEBA-HK (a.k.a. CoachHooK, "Consecutive Batch Model Editing with HooK Layers") and MEMIT-C.

One file per step of the method: ``templates`` (requests, context templates), ``compute_ks``
(keys), ``compute_z`` (target values), ``covariance`` (E[kk^T]), ``update`` (Eq. 13-15),
``scope`` (Eq. 16-19), ``hook_layers`` and ``state`` (persistent hook state), ``main`` (the step
and EasyEdit's apply function), ``runner`` (consecutive edits and their roll back, for the CLI). Importing this package loads nothing heavy.
"""
from .hparams import COMEBAHKHyperParams
from .main import apply_comeba_hk_to_model
from .state import load_hook_state, remove_hook_layers, save_hook_state

__all__ = ["COMEBAHKHyperParams", "apply_comeba_hk_to_model", "load_hook_state", "remove_hook_layers",
           "save_hook_state"]
