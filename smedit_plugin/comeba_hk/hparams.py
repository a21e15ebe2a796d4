"""COMEBA-HK / MEMIT-C hyperparameters: MEMIT's (EasyEdit's) field names plus the hook-layer knobs.

Defaults are the paper's GPT-J setting (MEMIT critical path 3-8, lambda 15000 for consecutive
editing, alpha_z 2.2). ``alg_name: MEMIT-C`` is the same algorithm without hook layers (weights
edited in place, Eq. 13 with the same ``C_accu``), so ``use_hook`` follows the name.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ..hparams_base import MethodHyperParams
from ..methods import alg_names_of, canonical_alg_name, method_spec

F = dataclasses.field


def _layers_increasing(hp: "COMEBAHKHyperParams") -> Optional[str]:
    if not hp.layers:
        return "field 'layers' is empty; list the critical-path layers to edit (e.g. [3, 4, 5, 6, 7, 8])"
    if any(b <= a for a, b in zip(hp.layers, hp.layers[1:])):
        return f"field 'layers' = {hp.layers} must be strictly increasing (the residual is spread lowest layer first); sort it and drop duplicates"
    return None


def _loss_layer_above(hp: "COMEBAHKHyperParams") -> Optional[str]:
    if hp.layers and hp.v_loss_layer <= hp.layers[-1]:
        return (f"field 'v_loss_layer' = {hp.v_loss_layer} must be above the last edited layer {hp.layers[-1]} "
                "(the NLL is read after the layers that carry delta to the targets; use the model's last layer)")
    return None


def _templates_have_slot(hp: "COMEBAHKHyperParams") -> Optional[str]:
    for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
        value = getattr(hp, name)
        if value.count("{}") != 1:
            return f"field {name!r} = {value!r} must contain exactly one '{{}}' for the layer index"
    return None


def _template_params(hp: "COMEBAHKHyperParams") -> Optional[str]:
    for pair in hp.context_template_length_params:
        if len(pair) != 2 or pair[0] < 1 or pair[1] < 1:
            return (f"field 'context_template_length_params' entry {pair} must be [length_in_tokens, n_templates] "
                    "with both >= 1 (MEMIT uses [[10, 5]])")
    return None


def _hook_matches_name(hp: "COMEBAHKHyperParams") -> Optional[str]:
    if hp.use_hook is not None and hp.use_hook != hp.hooks_enabled:
        with_hooks = [name for name in hp.ALG_NAMES if method_spec(name).hooks_enabled]
        return (f"use_hook: {str(hp.use_hook).lower()} contradicts alg_name {hp.alg_name!r}; use alg_name "
                f"{' or '.join(with_hooks)} for hooks, another of {list(hp.ALG_NAMES)} without (or drop use_hook)")
    return None


@dataclasses.dataclass(kw_only=True)
class COMEBAHKHyperParams(MethodHyperParams):
    """Every knob of MEMIT's target values, keys and covariance, and of COMEBA-HK's hook layers.

    ``batch_size`` is EasyEdit's chunk size (edits per consecutive step); the paper edits 10 at a
    time consecutively and 30 in single-round batch editing.
    """

    ALG_NAMES: ClassVar[tuple[str, ...]] = alg_names_of(f"{__name__}:COMEBAHKHyperParams")

    alg_name: str = "COMEBA-HK"
    batch_size: int = F(default=10, metadata={"range": (1, None), "help": "edits per consecutive step (EasyEdit chunk size)"})
    # -- where to edit (MEMIT names)
    layers: list[int] = F(default_factory=lambda: [3, 4, 5, 6, 7, 8], metadata={"range": (0, None), "help": "critical-path layers, strictly increasing"})
    layer_selection: str = F(default="all", metadata={"choices": ("all",)})
    fact_token: str = F(default="subject_last", metadata={"choices": ("subject_last",)})
    rewrite_module_tmp: str = "transformer.h.{}.mlp.fc_out"
    layer_module_tmp: str = "transformer.h.{}"
    mlp_module_tmp: str = "transformer.h.{}.mlp"
    attn_module_tmp: str = "transformer.h.{}.attn"
    ln_f_module: str = "transformer.ln_f"
    lm_head_module: str = "lm_head"
    # -- target values z (compute_z)
    v_num_grad_steps: int = F(default=25, metadata={"range": (1, None)})
    v_lr: float = F(default=0.5, metadata={"range": (0.0, None)})
    v_loss_layer: int = F(default=27, metadata={"range": (0, None), "help": "block whose output feeds the NLL (normally the last)"})
    v_weight_decay: float = F(default=0.5, metadata={"range": (0.0, None)})
    clamp_norm_factor: float = F(default=0.75, metadata={"range": (0.0, None)})
    kl_factor: float = F(default=0.0625, metadata={"range": (0.0, None)})
    z_chunk_size: int = F(default=16, metadata={"range": (0, None), "help": "facts whose target values are optimised together (exact; bounds the peak memory of a large batch); 0 = the whole batch at once"})
    z_prefix_cache: bool = F(default=True, metadata={"help": "recompute only tokens from the subject on during z steps (exact; false = full forward, needed for flash attention)"})
    context_template_length_params: list[list[int]] = F(default_factory=lambda: [[10, 5]], metadata={"help": "[[tokens, count], ...] of self-generated prefixes (MEMIT: [[10, 5]])"})
    seed: int = F(default=0, metadata={"range": (0, 2**32 - 1), "help": "seed of the context-template sampler (a local generator; the global RNG is untouched)"})
    # -- covariance E[k k^T]
    mom2_adjustment: bool = F(default=True, metadata={"help": "false = identity instead of E[kk^T] (least-norm update)"})
    mom2_update_weight: float = F(default=15000.0, metadata={"range": (0.0, None), "help": "lambda: 15000 consecutive, 5000 single-round (paper)"})
    mom2_dataset: str = F(default="wikitext-2", metadata={"help": "'wikitext-2' (bundled) or a UTF-8 text file, one document per line"})
    mom2_n_samples: int = F(default=100000, metadata={"range": (1, None), "help": "documents (non-empty lines) used, as in MEMIT"})
    mom2_max_len: int = F(default=1024, metadata={"range": (2, None), "help": "tokens kept per document"})
    mom2_dtype: str = F(default="float32", metadata={"choices": ("float32", "float64"), "help": "accumulation and C_accu storage dtype"})
    cov_ridge: float = F(default=0.0, metadata={"range": (0.0, None), "help": "beta: E[kk^T] + beta*I (paper's Limitations)"})
    cov_shrinkage: float = F(default=0.0, metadata={"range": (0.0, 1.0), "help": "rho: (1-rho) C + rho tr(C)/f I for small corpora"})
    stats_dir: Optional[str] = F(default=None, metadata={"help": "covariance cache folder; null = <cache_dir>/comeba_hk/stats"})
    # -- hook layers (COMEBA-HK)
    use_hook: Optional[bool] = F(default=None, metadata={"help": "null = true for COMEBA-HK, false for MEMIT-C"})
    alpha_z: float = F(default=2.2, metadata={"range": (0.5, None), "help": "initial z-score threshold; alpha only decreases from here (below ~0.5 the hooks fire on a large share of all tokens, at or below 0 on every token above the mean)"})
    calibrate_with_validated_hooks: bool = F(default=False, metadata={"help": "alpha calibration forward with every hook validated, as at inference (spec A12); false = recording only, as the authors' code"})
    ddof: int = F(default=1, metadata={"range": (0, 1), "help": "std estimator of the scope test (1 = unbiased, as the authors' code)"})
    mask_padding: bool = F(default=True, metadata={"help": "padding never counts in the z-score nor is swapped"})
    mask_bos: bool = F(default=True, metadata={"help": "a BOS the tokenizer adds never counts in the z-score nor is swapped"})
    model_dtype: Optional[str] = F(default=None, metadata={"choices": ("float32", "bfloat16", "float16"), "help": "dtype the model is loaded in; null = float16 if fp16 else float32"})
    fp32_edit_weights: Optional[bool] = F(default=None, metadata={"help": "MEMIT-C: hold the rewrite modules in float32 during a step and round once at its end (costs one float32 copy of each edited weight); null = on for bf16/fp16 models"})

    _checks: ClassVar[tuple] = (_layers_increasing, _loss_layer_above, _templates_have_slot, _template_params, _hook_matches_name)

    @property
    def hooks_enabled(self) -> bool:
        """Hook layers (COMEBA-HK) or in-place weight edits (MEMIT-C), as the method table declares;
        ``use_hook`` may only confirm it."""
        return method_spec(canonical_alg_name(self.alg_name)).hooks_enabled

    def rewrite_module_names(self) -> list[str]:
        """``rewrite_module_tmp`` filled in for every edited layer, lowest first."""
        return [self.rewrite_module_tmp.format(layer) for layer in self.layers]
