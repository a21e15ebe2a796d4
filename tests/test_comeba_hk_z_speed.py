"""The speed-ups of COMEBA-HK's target values are exact (or bounded, for reduced matmul precision) and scale."""
from __future__ import annotations

import itertools

import pytest
import torch

from smedit_plugin.comeba_hk import COMEBAHKHyperParams, apply_comeba_hk_to_model
from smedit_plugin.comeba_hk import covariance
from smedit_plugin.comeba_hk import main as comeba_main
from smedit_plugin.comeba_hk.compute_z import _split_by_width, compute_target_values
from smedit_plugin.comeba_hk.templates import TokenView, prepare_requests
from smedit_plugin.testing import tiny_model
from smedit_plugin.tfcompat import cache_keyword

LLAMA = dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
             mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
             ln_f_module="model.norm", lm_head_module="lm_head")
REQUESTS = [
    {"prompt": "The name of the capital city of France is", "subject": "France", "target_new": "Rome"},
    {"prompt": "Which family does Ramalinaceae belong to?", "subject": "Ramalinaceae", "target_new": "Lamiinae"},
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "What university did Watts Humphrey attend?", "subject": "Watts Humphrey", "target_new": "Yale"},
]
GROUPS = [["{}"], ["Yesterday it rained. {}", "I think that {}"]]

pytestmark = pytest.mark.usefixtures("direct_call_semantics")


def _hp(stats_dir: str, **changes) -> COMEBAHKHyperParams:
    base = dict(model_name="tiny-llama", layers=[1, 2], v_loss_layer=3, v_num_grad_steps=5, clamp_norm_factor=4.0,
                mom2_update_weight=10.0, mom2_n_samples=60, mom2_max_len=32, stats_dir=stats_dir,
                context_template_length_params=[[4, 2]], **LLAMA)
    base.update(changes)
    return COMEBAHKHyperParams(**base)


def _target_values(model, tok, hp: COMEBAHKHyperParams, requests=REQUESTS):
    mods = comeba_main._Modules(model, hp)
    return compute_target_values(model, TokenView(tok), prepare_requests(requests), GROUPS, mods.z_block,
                                 mods.upper_blocks, mods.ln_f, mods.lm_head, mods.softcap, hp, torch.device("cpu"))


def _brute_force_cost(widths: list[int], counts: list[int], max_groups: int) -> int:
    """Fewest padded tokens over every cut of the width-sorted prompts into at most ``max_groups`` runs."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    best = None
    for k in range(0, max_groups):
        for cuts in itertools.combinations(range(1, len(order)), k):
            bounds = [0, *cuts, len(order)]
            cost = sum(sum(counts[i] for i in order[lo:hi]) * max(widths[i] for i in order[lo:hi])
                       for lo, hi in zip(bounds, bounds[1:]))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_groups", [1, 2, 3])
def test_suffix_buckets_pad_as_little_as_every_possible_cut(seed: int, max_groups: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    n = 1 + seed * 2
    widths = torch.randint(1, 12, (n,), generator=generator).tolist()
    counts = torch.randint(1, 8, (n,), generator=generator).tolist()
    groups = _split_by_width(widths, counts, max_groups)
    assert sorted(i for g in groups for i in g) == list(range(n))
    assert len(groups) <= max_groups
    cost = sum(sum(counts[i] for i in g) * max(widths[i] for i in g) for g in groups)
    assert cost == _brute_force_cost(widths, counts, max_groups)


def test_a_saved_cache_state_can_be_restored_again_and_again() -> None:
    """Each suffix bucket restores its own rows of the KV cache at every step; a forward must not spoil that."""
    from transformers import DynamicCache

    from smedit_plugin.comeba_hk.modules import cache_state, restore_cache_state

    model, _ = tiny_model("llama3", n_layers=2)
    cache = DynamicCache(config=model.config)
    keyword = cache_keyword(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), use_cache=True, **{keyword: cache})
    saved = cache_state(cache)
    keys = [layer.keys.clone() for layer in cache.layers]
    for _ in range(2):
        with torch.no_grad():
            model(input_ids=torch.tensor([[11], [12]]), use_cache=True, **{keyword: cache})
        assert cache.get_seq_length() == 4
        restore_cache_state(saved)
        assert cache.get_seq_length() == 3
        assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, keys))


def test_one_fact_at_a_time_equals_all_facts_together(stats_dir: str) -> None:
    """Batched z: each fact's delta, loss, Adam state and clamp are its own, so per-fact runs agree."""
    model, tok = tiny_model("llama3", n_layers=4)
    z_all, info_all = _target_values(model, tok, _hp(stats_dir, z_chunk_size=0))
    for index, request in enumerate(REQUESTS):
        z_one, info_one = _target_values(model, tok, _hp(stats_dir, z_chunk_size=0), [request])
        assert torch.allclose(z_one[:, 0], z_all[:, index], atol=1e-4 * float(z_all.abs().max()))
        assert info_one["z_loss"][0] == pytest.approx(info_all["z_loss"][index], rel=1e-4)
        assert info_one["z_steps"][0] == info_all["z_steps"][index]


def test_a_second_run_reads_the_statistics_from_disk(stats_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh copy of the same model (a new run) finds the cached E[kk^T]; no statistics pass happens again."""
    hp = _hp(stats_dir, v_num_grad_steps=2)
    first, tok = tiny_model("llama3", n_layers=4)
    apply_comeba_hk_to_model(first, tok, REQUESTS[:2], hp)

    def no_pass(*args, **kwargs):
        raise AssertionError("the covariance statistics were computed again")

    monkeypatch.setattr(covariance, "collect_second_moments", no_pass)
    second, tok = tiny_model("llama3", n_layers=4)
    apply_comeba_hk_to_model(second, tok, REQUESTS[2:], hp)
    other, tok = tiny_model("llama3", n_layers=4, seed=1)
    with pytest.raises(AssertionError, match="computed again"):
        apply_comeba_hk_to_model(other, tok, REQUESTS[2:], hp)
