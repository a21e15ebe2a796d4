"""MetaTrainer on a tiny random SmolLM2-shaped model and real ZsRE records (meta-editing spec §4, §9).

The training step is checked against MALMEN done by hand from the tested building blocks, then the
step/optimiser structure of each method: step-wise Adam for batch mode, one Adam step per trajectory
in sequential mode, step-specific networks with rank decay, RLEdit's backtracking weights.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from smedit_plugin.records import EditRecord, load_records
from smedit_plugin.hypernet.cache import cache_keys_and_value_grads
from smedit_plugin.hypernet.editor import HypernetEditor
from smedit_plugin.answers import answer_logits
from smedit_plugin.hypernet.losses import answer_cross_entropy, kl_locality
from smedit_plugin.hypernet.shifts import accumulate_meta_grad, add_param_shift_, predict_param_shift, weight_grad_in_out
from smedit_plugin.hypernet.trainer import MetaTrainer
from smedit_plugin.rledit2.hparams import backtracking_weights
from smedit_plugin.malmen2.hparams import MALMEN2HyperParams
from smedit_plugin.rledit2.hparams import RLEdit2HyperParams
from smedit_plugin.smedit.hparams import SMEditHyperParams
from smedit_plugin.text import build_batch

# Two up_proj modules share one (64, 128) network (module_idx 0 and 1); down_proj has its own.
MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
SMALL = dict(model_name="tiny-smollm2", edit_modules=MODULES, rank=4, n_blocks=2, lr=1e-3, meta_lr=1e-3,
             n_edits=2, micro_batch_size=2, chunk_size=3, max_steps=1)


@pytest.fixture(scope="module")
def tiny4(tiny):
    """One random 4-layer SmolLM2-shaped model per module; tests edit deep copies of it."""
    return tiny("smollm2", n_layers=4)


@pytest.fixture(scope="module")
def records(zsre_train_path) -> list[EditRecord]:
    return load_records(zsre_train_path, dataset="zsre", limit=12)


def fresh(tiny4) -> nn.Module:
    """A private copy of the tiny model, so tests cannot leak edits into each other."""
    return copy.deepcopy(tiny4[0])


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), f"{name} changed"


def record_optimizer_grads(trainer: MetaTrainer) -> list[list[torch.Tensor]]:
    """Hypernetwork gradients as Adam sees them (after clipping), one list per optimiser step."""
    seen: list[list[torch.Tensor]] = []
    params = trainer.editor.unique_parameters()
    trainer.opt.register_step_pre_hook(lambda opt, args, kwargs: seen.append([p.grad.clone() for p in params]))
    return seen


def copy_editor(editor: HypernetEditor, model: nn.Module) -> HypernetEditor:
    """The same networks (weights and normaliser statistics) bound to ``model``."""
    twin = HypernetEditor(model, editor.hparams, num_seq=editor.num_seq)
    twin.nets.load_state_dict(editor.nets.state_dict())
    return twin


def only_edit_weights_trainable(model: nn.Module, editor: HypernetEditor) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for name in editor.module_names:
        editor.edit_module(name).weight.requires_grad_(True)


def malmen_by_hand(model: nn.Module, tok, editor: HypernetEditor, batch: list[EditRecord],
                   hp: MALMEN2HyperParams) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One MALMEN training batch (spec §4.1): cache -> predict -> apply -> CE+KL -> meta-grad -> clip -> Adam."""
    only_edit_weights_trainable(model, editor)
    pairs = [(n, editor.edit_module(n)) for n in editor.module_names]
    edit = [build_batch(tok, [r.prompt for r in batch], [r.target_new for r in batch])]
    equiv = [build_batch(tok, [r.rephrase_prompts[0] for r in batch], [r.target_new for r in batch])]
    unrel = [build_batch(tok, [r.locality_prompts[0] for r in batch], [r.locality_answers[0] for r in batch])]
    with torch.no_grad():
        refs = [answer_logits(model, mb).float() for mb in unrel]
    caches = cache_keys_and_value_grads(model, pairs, edit)
    for pos, name in enumerate(editor.module_names):
        editor.net_for(0, pos).update_normaliser(caches[name].keys, caches[name].value_grads)
    shifts, solvers = {}, {}
    for pos, (name, module) in enumerate(pairs):
        shifts[name], solvers[name] = predict_param_shift(editor.net_for(0, pos), editor.module_idx[pos],
                                                          caches[name], chunk_size=hp.chunk_size)
        add_param_shift_(module, shifts[name])
    for mb in equiv:
        answer_cross_entropy(model, mb).backward()
    for mb, ref in zip(unrel, refs):
        (hp.loc_coef * kl_locality(ref, answer_logits(model, mb))).backward()
    params = editor.unique_parameters()
    opt = torch.optim.Adam(params, lr=hp.meta_lr)
    for pos, (name, module) in enumerate(pairs):
        accumulate_meta_grad(editor.net_for(0, pos), editor.module_idx[pos], caches[name], solvers[name],
                             shifts[name], weight_grad_in_out(module), chunk_size=hp.chunk_size)
    torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
    grads = [p.grad.clone() for p in params]
    opt.step()
    return grads, shifts


def test_malmen1_batch_through_the_trainer_equals_malmen_by_hand(tiny4, records) -> None:
    model, tok = fresh(tiny4), tiny4[1]
    hp = MALMEN2HyperParams(alg_name="MALMEN1", max_grad_norm=1e-4, **SMALL)
    torch.manual_seed(0)
    trainer = MetaTrainer(model, tok, hp)
    model_ref = copy.deepcopy(model)
    editor_ref = copy_editor(trainer.editor, model_ref)
    before = params_of(model)
    seen = record_optimizer_grads(trainer)
    batch = trainer._batches(records)[0]

    state = trainer.train(records, progress=False)

    grads_ref, shifts_ref = malmen_by_hand(model_ref, tok, editor_ref, batch, hp)
    assert hp.bp_steps == 1 and state.optimizer_steps == 1 and len(seen) == 1
    assert all(s.abs().sum() > 0 for s in shifts_ref.values())
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen[0]]))
    assert norm == pytest.approx(hp.max_grad_norm, rel=1e-4)  # clipping was active, not a no-op
    for got, want in zip(seen[0], grads_ref):
        assert torch.equal(got, want)
    named_ref = dict(editor_ref.nets.named_parameters())
    for name, param in trainer.editor.nets.named_parameters():
        assert torch.equal(param, named_ref[name]), name
    for name, buf in trainer.editor.nets.named_buffers():
        assert torch.equal(buf, dict(editor_ref.nets.named_buffers())[name]), name
    assert_same_params(model, before)


def test_malmen2_with_a_frozen_network_stacks_two_steps(tiny4, records, monkeypatch) -> None:
    model, tok = fresh(tiny4), tiny4[1]
    hp = MALMEN2HyperParams(**{**SMALL, "meta_lr": 0.0})
    torch.manual_seed(0)
    trainer = MetaTrainer(model, tok, hp)
    model_ref = copy.deepcopy(model)
    editor_ref = copy_editor(trainer.editor, model_ref)
    nets_before = copy.deepcopy(trainer.editor.nets.state_dict())
    weights_at_loss: list[dict[str, torch.Tensor]] = []
    meta_loss = trainer._meta_loss_grads

    def spy(*args, **kwargs):
        weights_at_loss.append({n: w.detach().clone() for n, w in trainer.weights.items()})
        return meta_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "_meta_loss_grads", spy)
    batch = trainer._batches(records)[0]
    trainer.train(records, progress=False)

    edit = editor_ref.edit_micro_batches(tok, [r.prompt for r in batch], [r.target_new for r in batch])
    only_edit_weights_trainable(model_ref, editor_ref)
    expected = []
    for s in range(2):
        editor_ref.bp_step(model_ref, edit, s, update_normaliser=True)
        expected.append({n: editor_ref.edit_module(n).weight.detach().clone() for n in MODULES})
    assert hp.bp_steps == 2 and trainer.state.optimizer_steps == 2 and len(weights_at_loss) == 2
    for got, want in zip(weights_at_loss, expected):
        for name in MODULES:
            assert torch.equal(got[name], want[name]), name
    for name in MODULES:
        assert not torch.equal(expected[1][name], expected[0][name])  # the second step moved the weights again
    for key, value in trainer.editor.nets.state_dict().items():
        if key.endswith(("normaliser.n", "normaliser.mean", "normaliser.var", "normaliser.std")):
            continue
        assert torch.equal(value, nets_before[key]), key  # meta_lr 0: only the normaliser statistics moved


def test_batch_training_moves_the_hypernet_and_restores_weights_and_flags(tiny4, records, monkeypatch) -> None:
    model, tok = fresh(tiny4), tiny4[1]
    for name, p in model.named_parameters():
        p.requires_grad_("layers.2" in name or "embed" in name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = params_of(model)
    hp = MALMEN2HyperParams(**{**SMALL, "max_steps": 2})
    trainer = MetaTrainer(model, tok, hp)
    nets_before = copy.deepcopy(trainer.editor.nets.state_dict())
    train_batch = trainer._train_batch
    restored_after: list[int] = []

    def checked(batch):
        loss = train_batch(batch)
        assert_same_params(model, before)
        restored_after.append(len(batch))
        return loss

    monkeypatch.setattr(trainer, "_train_batch", checked)
    state = trainer.train(records, progress=False)

    assert restored_after == [2, 2] and state.units_done == 2 and state.edits_seen == 4
    assert state.optimizer_steps == 2 * hp.bp_steps
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = trainer.editor.nets.state_dict()
    for key in after:
        if key.endswith(("lr.weight", "lamda.weight", "shift.weight", ".B", ".bias")):
            assert not torch.equal(after[key], nets_before[key]), f"{key} did not move"
    assert [h["unit"] for h in state.history] == [1, 2] and all(h["loss"] > 0 for h in state.history)


def test_smedit_batch_shares_one_network_with_an_adam_step_per_bp_step(tiny4, records, monkeypatch) -> None:
    model, tok = fresh(tiny4), tiny4[1]
    hp = SMEditHyperParams(**{**SMALL, "max_steps": 2})
    trainer = MetaTrainer(model, tok, hp)
    editor = trainer.editor
    assert hp.num_seq == 1 and hp.bp_steps == 2
    assert editor.shared and len(editor.nets) == 1
    assert editor.net_for(0, 0) is editor.net_for(1, 0) and editor.net_for(0, 2) is editor.net_for(1, 2)
    listed = trainer.opt.param_groups[0]["params"]
    assert len({id(p) for p in listed}) == len(listed) == len(list(editor.nets.parameters()))
    steps: list[int] = []
    bp_step = editor.bp_step
    monkeypatch.setattr(editor, "bp_step", lambda m, mbs, s, **kw: (steps.append(s), bp_step(m, mbs, s, **kw))[1])

    state = trainer.train(records, progress=False)

    assert steps == [0, 1, 0, 1]
    assert state.optimizer_steps == 2 * hp.bp_steps
    assert {float(trainer.opt.state[p]["step"]) for p in listed} == {4.0}  # no duplicated parameters


def test_shift_penalty_adds_two_reg_coef_shift_to_weight_grads(tiny4) -> None:
    hp = SMEditHyperParams(**{**SMALL, "reg_coef": 0.25})
    trainer = MetaTrainer(fresh(tiny4), tiny4[1], hp)
    gen = torch.Generator().manual_seed(0)
    a, b = MODULES[0], MODULES[2]
    shifts = {a: torch.randn(3, 2, generator=gen), b: torch.randn(2, 2, generator=gen)}
    grads = {a: torch.randn(3, 2, generator=gen)}
    out = trainer._add_shift_penalty(grads, shifts, 0.5)
    torch.testing.assert_close(out[a], grads[a] + 2 * 0.25 * 0.5 * shifts[a], rtol=0, atol=0)
    torch.testing.assert_close(out[b], 2 * 0.25 * 0.5 * shifts[b], rtol=0, atol=0)  # no CE gradient there
    malmen = MetaTrainer(fresh(tiny4), tiny4[1], MALMEN2HyperParams(**SMALL))
    assert malmen._add_shift_penalty(grads, shifts, 1.0) is grads  # MALMEN has no l2 term


def test_relative_shift_penalty_is_the_gradient_of_reg_shift_norm_over_weight_norm(tiny4) -> None:
    model = fresh(tiny4)
    trainer = MetaTrainer(model, tiny4[1], SMEditHyperParams(**{**SMALL, "reg_coef": 0.25,
                                                                "shift_penalty_norm": "relative"}))
    gen = torch.Generator().manual_seed(1)
    shifts = {n: torch.randn(model.get_submodule(n).weight.T.shape, generator=gen, requires_grad=True)
              for n in MODULES}
    out = trainer._add_shift_penalty({}, {n: s.detach() for n, s in shifts.items()}, 0.5)
    for name, shift in shifts.items():
        weight = model.get_submodule(name).weight.detach()
        penalty = 0.25 * 0.5 * shift.pow(2).sum() / weight.pow(2).sum()
        torch.testing.assert_close(out[name], torch.autograd.grad(penalty, shift)[0], rtol=1e-6, atol=0)
    # two modules of different norms get different factors: the form is relative per module
    assert len({round(v, 12) for v in trainer._penalty_norm.values()}) == len(MODULES)


def test_smedit_sequential_trains_step_specific_nets_with_rank_decay(tiny4, records, monkeypatch) -> None:
    model, tok = fresh(tiny4), tiny4[1]
    before = params_of(model)
    hp = SMEditHyperParams(**{**SMALL, "num_seq": 2})
    trainer = MetaTrainer(model, tok, hp)
    editor = trainer.editor
    assert not editor.shared and len(editor.nets) == 2 and editor.describe()["ranks"] == [4, 2]
    for pos, hidden in ((0, 64 + 128), (2, 128 + 64)):
        assert editor.net_for(0, pos).blocks[0].A.shape == (hidden, 4)
        assert editor.net_for(1, pos).blocks[0].A.shape == (hidden, 2)
    nets_before = copy.deepcopy(editor.nets.state_dict())
    steps: list[int] = []
    bp_step = editor.bp_step
    monkeypatch.setattr(editor, "bp_step", lambda m, mbs, s, **kw: (steps.append(s), bp_step(m, mbs, s, **kw))[1])

    state = trainer.train(records, progress=False)

    assert steps == [0, 1, 0, 1]  # two batches of the trajectory, two stacked steps each
    assert state.units_done == 1 and state.edits_seen == 4 and state.optimizer_steps == 1
    assert {float(s["step"]) for s in trainer.opt.state.values()} == {1.0}
    after = editor.nets.state_dict()
    for s in range(2):
        assert not torch.equal(after[f"{s}.(64, 128).lr.weight"], nets_before[f"{s}.(64, 128).lr.weight"])
    assert_same_params(model, before)


def test_backtracking_weights() -> None:
    assert backtracking_weights(0, 10, 1.0, 0.95) == [1.0]
    assert backtracking_weights(3, 10, 1.0, 0.95) == pytest.approx([1.0, 0.95, 0.95 ** 2, 0.95 ** 3])
    deep = backtracking_weights(25, 10, 1.0, 0.95)
    assert len(deep) == 10 and deep[-1] == pytest.approx(0.95 ** 9)  # current batch + 9 earlier (q - 1)
    assert backtracking_weights(2, 2, 0.9, 0.5) == pytest.approx([0.81, 0.405])
    assert backtracking_weights(4, 1, 0.5, 0.95) == pytest.approx([0.5 ** 4])


def test_rledit2_trajectory_scores_the_backtracking_window(tiny4, records, monkeypatch) -> None:
    model, tok = fresh(tiny4), tiny4[1]
    before = params_of(model)
    hp = RLEdit2HyperParams(**{**SMALL, "num_seq": 3, "back_depth": 2, "discount": 0.9, "time_decay": 0.5,
                               "loc_coef": 0.0})
    trainer = MetaTrainer(model, tok, hp)
    assert not trainer.editor.shared and trainer.editor.describe()["ranks"] == [4, 2]
    calls: list[tuple[list, list[float]]] = []
    meta_loss = trainer._meta_loss_grads

    def spy(equiv, unrel, refs, weights, *rest):
        calls.append((equiv, list(weights)))
        return meta_loss(equiv, unrel, refs, weights, *rest)

    monkeypatch.setattr(trainer, "_meta_loss_grads", spy)
    trajectory = trainer._batches(records)[0]
    batches = [trajectory[i:i + 2] for i in range(0, 6, 2)]

    state = trainer.train(records, progress=False)

    def batch_of(mbs: list[dict]) -> int:
        hits = [k for k, b in enumerate(batches)
                if all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(mbs, trainer._equiv_mbs(b)))]
        assert len(hits) == 1
        return hits[0]

    assert [[batch_of(mbs) for mbs in equiv] for equiv, _ in calls] == [[0], [1, 0], [2, 1]]
    assert [w for _, w in calls] == [pytest.approx(x) for x in ([1.0], [0.9, 0.45], [0.81, 0.405])]
    assert state.optimizer_steps == 1
    assert_same_params(model, before)


def test_malmen_sequential_keeps_its_kl_term(tiny4, records, monkeypatch) -> None:
    model, tok = fresh(tiny4), tiny4[1]
    hp = MALMEN2HyperParams(alg_name="MALMEN1", hypernet_device="cpu", **{**SMALL, "num_seq": 2})
    trainer = MetaTrainer(model, tok, hp)
    assert trainer.sequential and trainer.editor.device == torch.device("cpu")
    calls: list[tuple[list, list]] = []
    meta_loss = trainer._meta_loss_grads

    def spy(equiv, unrel, refs, weights, *rest):
        calls.append((unrel, refs))
        return meta_loss(equiv, unrel, refs, weights, *rest)

    monkeypatch.setattr(trainer, "_meta_loss_grads", spy)
    trainer.train(records, progress=False)
    assert len(calls) == 2
    for unrel, refs in calls:  # reference logits for every unrelated micro-batch of the current batch
        assert len(unrel) == len(refs) == 1 and len(refs[0]) == len(unrel[0]) == 1
        assert refs[0][0].shape[0] == int((unrel[0][0]["labels"] != -100).sum())


def test_a_training_step_reaches_the_low_rank_blocks(tiny4, records) -> None:
    """B = 0 and bias = 0 at init put every pre-activation at exactly 0: the gradient must still get through."""
    trainer = MetaTrainer(fresh(tiny4), tiny4[1], MALMEN2HyperParams(alg_name="MALMEN1", **SMALL))
    seen = record_optimizer_grads(trainer)
    trainer.train(records, progress=False)
    names = [n for n, _ in trainer.editor.nets.named_parameters()]
    grads = dict(zip(names, seen[0]))
    for name, grad in grads.items():
        if name.endswith((".B", ".bias")):
            assert grad.abs().sum() > 0, f"{name} got no gradient"


def test_reference_adam_duplicates_equals_adam_with_the_shared_network_listed_per_step(tiny4, records) -> None:
    """The switch reproduces the reference optimiser: a shared network listed once per BP step (spec §1.6)."""
    hp = MALMEN2HyperParams(**{**SMALL, "max_steps": 2, "meta_lr": 1e-2})
    tok = tiny4[1]

    def trained(hparams, listed_per_step: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = fresh(tiny4)
        editor = HypernetEditor(model, hparams)
        opt = None
        if listed_per_step:  # the reference's construction; PyTorch warns about the duplicates
            params = [p for _ in range(hparams.bp_steps) for p in editor.unique_parameters()]
            opt = torch.optim.Adam(params, lr=hparams.meta_lr, foreach=False)
        trainer = MetaTrainer(model, tok, hparams, editor=editor, optimizer=opt)
        trainer.train(records, progress=False)
        return {n: p.detach().clone() for n, p in trainer.editor.nets.named_parameters()}

    with pytest.warns(UserWarning, match="duplicate parameters"):
        reference = trained(hp, listed_per_step=True)
    emulated = trained(hp.replace(reference_adam_duplicates=True), listed_per_step=False)
    plain = trained(hp, listed_per_step=False)
    assert MetaTrainer(fresh(tiny4), tok, hp.replace(reference_adam_duplicates=True)).adam_updates_per_step() == 2
    for name, value in reference.items():
        torch.testing.assert_close(emulated[name], value, rtol=1e-6, atol=1e-9, msg=name)
    assert any(not torch.allclose(plain[n], reference[n]) for n in reference)  # the switch changes training


# -- training budget: per-epoch validation, best networks kept, early stopping ----------------------------------

def _budget_trainer(tiny4, **extra) -> MetaTrainer:
    hp = SMEditHyperParams(**{**SMALL, "max_steps": -1, "n_epochs": 4, **extra})
    torch.manual_seed(0)
    return MetaTrainer(fresh(tiny4), tiny4[1], hp)


def test_validation_after_every_epoch_keeps_the_best_networks(tiny4, records) -> None:
    trainer = _budget_trainer(tiny4)
    val_losses = iter([3.0, 1.0, 2.0, 1.5])  # the best is after epoch 2
    saved: list[tuple[int, dict]] = []

    def checkpoint(t: MetaTrainer) -> None:
        saved.append((t.state.units_done, copy.deepcopy(t.editor.nets.state_dict())))

    state = trainer.train(records[:4], validate=lambda: {"loss": next(val_losses)}, checkpoint=checkpoint,
                          progress=False)
    per_epoch = trainer.units_per_epoch(4)
    assert per_epoch == 2 and state.units_done == 8
    assert [e["unit"] for e in state.history if "val" in e] == [2, 4, 6, 8]
    assert [u for u, _ in saved] == [2, 4]  # the archive is written only when the validation loss improves
    assert state.best_unit == 4 and state.best_val_loss == 1.0 and not state.stopped_early
    for name, value in trainer.editor.nets.state_dict().items():  # the editor ends with the best networks
        assert torch.equal(value, saved[-1][1][name]), name
    assert not all(torch.equal(v, saved[0][1][k]) for k, v in saved[-1][1].items())


def test_early_stopping_after_patience_validations_without_improvement(tiny4, records) -> None:
    trainer = _budget_trainer(tiny4, early_stop_patience=2)
    val_losses = iter([1.0, 1.5, 1.2, 0.5])
    state = trainer.train(records[:4], validate=lambda: {"loss": next(val_losses)}, progress=False)
    assert state.stopped_early and state.units_done == 6 and state.best_unit == 2
    assert state.stale_validations == 2


def test_validation_loss_of_networks_that_do_not_edit_is_the_unedited_rephrase_loss(tiny4, records) -> None:
    trainer = _budget_trainer(tiny4, n_edits=2)
    for nets in trainer.editor.nets:
        for net in nets.values():
            torch.nn.init.zeros_(net.lr.weight)  # every shift is zero
    before = params_of(trainer.model)
    val = records[4:8]
    with torch.no_grad():
        expected = sum(float(answer_cross_entropy(trainer.model, mb)) for mb in trainer._equiv_mbs(val)) / 2
    assert trainer.validation_loss(val) == pytest.approx(expected, rel=1e-6)
    assert_same_params(trainer.model, before)
    with torch.no_grad():  # fewer records than one unit: one shorter unit
        short = float(answer_cross_entropy(trainer.model, trainer._equiv_mbs(val[:1], shard=False)[0]))
    assert trainer.validation_loss(val[:1]) == pytest.approx(short, rel=1e-6)
    with pytest.raises(ValueError, match="at least one record"):
        trainer.validation_loss([])


def test_validation_loss_falls_when_the_networks_edit_towards_the_targets(tiny4, records) -> None:
    trainer = _budget_trainer(tiny4, n_edits=4, lr=1e-1)
    val = records[4:8]
    edited = trainer.validation_loss(val)
    for nets in trainer.editor.nets:
        for net in nets.values():
            torch.nn.init.zeros_(net.lr.weight)
    assert edited < trainer.validation_loss(val)


def test_split_validation_is_seeded_disjoint_and_complete(records) -> None:
    from smedit_plugin.hypernet.training import split_validation

    train, val = split_validation(records, 0.25, seed=3)
    assert len(val) == 3 and len(train) == 9
    assert {id(r) for r in train}.isdisjoint({id(r) for r in val})
    assert [r.prompt for r in train] == [r.prompt for r in records if all(r is not v for v in val)]
    assert split_validation(records, 0.25, seed=3)[1] == val and split_validation(records, 0.25, seed=4)[1] != val


def test_trajectory_reuses_locality_logits_of_the_last_meta_loss_pass_as_references(tiny4, records) -> None:
    """The reference logits of earlier batches come from the previous pass at the same weights: same training."""
    hp = RLEdit2HyperParams(**{**SMALL, "num_seq": 3, "back_depth": 3, "loc_coef": 0.5, "max_steps": 2})
    results = []
    for reuse in (True, False):
        torch.manual_seed(0)
        trainer = MetaTrainer(fresh(tiny4), tiny4[1], hp)
        trainer.reuse_reference_logits = reuse
        forwards = []
        original = trainer._reference_logits

        def counted(mbs, prefix, pool, known=None):
            forwards.append(sum(1 for mb in mbs if not (known and id(mb) in known)))
            return original(mbs, prefix, pool, known)

        trainer._reference_logits = counted
        state = trainer.train(records, progress=False)
        results.append((sum(forwards), [e["loss"] for e in state.history], trainer.editor.state_dict()))
    (n_reuse, loss_reuse, nets_reuse), (n_plain, loss_plain, nets_plain) = results
    assert n_plain == 2 * (1 + 2 + 3) and n_reuse == 2 * 3  # one micro-batch per batch; windows of 1, 2, 3 batches
    assert loss_reuse == pytest.approx(loss_plain, rel=1e-6)
    for name, value in nets_reuse.items():
        assert torch.allclose(value, nets_plain[name], rtol=1e-5, atol=1e-8), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_a_half_precision_model_keeps_an_fp32_hypernetwork(tiny4, records, dtype) -> None:
    """``model_dtype: bfloat16`` as the reference runs it: the LLM in half precision, networks and solve in fp32."""
    model = fresh(tiny4).to(dtype)
    before = params_of(model)
    hp = SMEditHyperParams(**{**SMALL, "model_dtype": "bfloat16" if dtype == torch.bfloat16 else "float16"})
    torch.manual_seed(0)
    trainer = MetaTrainer(model, tiny4[1], hp)
    initial = copy.deepcopy(trainer.editor.state_dict())
    state = trainer.train(records, progress=False)
    assert all(p.dtype == torch.float32 for p in trainer.editor.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.editor.parameters())
    assert math.isfinite(state.history[-1]["loss"]) and state.optimizer_steps == hp.bp_steps
    assert any(not torch.equal(v, initial[k]) for k, v in trainer.editor.state_dict().items())
    assert_same_params(model, before)
