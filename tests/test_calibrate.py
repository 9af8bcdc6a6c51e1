"""Layer calibration by first-token KL (VTW's procedure, applied to ParVTS's discard layer)."""

from __future__ import annotations

import pytest
import torch
from conftest import N_VISUAL, batch, make_prompt

from vtprune import cli
from vtprune.eval import calibrate

BATCHES = [batch([make_prompt(2, 4, 1), make_prompt(5, 9, 2)]), batch([make_prompt(3, 2, 3)], seed=1)]


def test_sweep_settings_cover_layers_and_fusions():
    s = calibrate.sweep_settings("parvts", 4, fixed={"budget": 8})
    assert len(s) == 3 * 3 and s[0] == {"discard_layer": 1, "fusion": "attention_mass", "budget": 8}
    assert calibrate.sweep_settings("parvts", 6, [2, 3], {"fusion": "size"}) == [
        {"discard_layer": 2, "fusion": "size"}, {"discard_layer": 3, "fusion": "size"}]
    assert calibrate.sweep_settings("vtw", 3) == [{"layer": 1}, {"layer": 2}]
    with pytest.raises(ValueError, match="calibrate supports"):
        calibrate.sweep_settings("fastv", 6)


def test_nothing_pruned_has_zero_kl_and_the_smallest_layer_is_chosen(model):
    settings = calibrate.sweep_settings("parvts", 6, [2, 4], {"budget": N_VISUAL, "fusion": "fixed"})
    rows, chosen = calibrate.calibrate(model, BATCHES, "parvts", settings, threshold=1e-6)
    assert [r.kl_mean for r in rows] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert all(r.agreement == 1.0 for r in rows)
    assert chosen == {"discard_layer": 2, "budget": N_VISUAL, "fusion": "fixed"}


def test_kl_is_measured_against_the_unpruned_first_token(model):
    ref, _ = calibrate.first_token_logprobs(model, BATCHES[0])
    lp, samples = calibrate.first_token_logprobs(model, BATCHES[0], "vtw", layer=1)
    expected = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    rows, chosen = calibrate.calibrate(model, BATCHES[:1], "vtw", [{"layer": 1}], threshold=0.0)
    assert rows[0].kl_mean == pytest.approx(expected, rel=1e-5) and expected > 0
    assert chosen is None  # withdrawing every visual token after layer 1 changes the distribution
    assert samples[0]["visual_tokens_per_layer_prefill"] == [N_VISUAL] + [0] * 5
    assert torch.allclose(ref.exp().sum(-1), torch.ones(2))
    md = calibrate.markdown(rows, chosen, 0.0)
    assert "| 1 |" in md and "no setting has mean KL <= 0.0" in md


def test_cli_calibrate_rejects_budget_for_vtw(capsys):
    assert cli.main(["calibrate", "--method", "vtw", "--budget", "4"]) == 2
    assert "parvts options" in capsys.readouterr().err
