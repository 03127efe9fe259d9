"""The metric schema (spin_kernels.training.metrics): the producers write exactly its keys, and the
plots draw them."""

from __future__ import annotations

import pytest
import torch

from spin_kernels import spin_loss
from spin_kernels.demo.tiny import demo_tokenizer
from spin_kernels.training.evaluation import heldout_metrics, synthetic_stats
from spin_kernels.training.metrics import HELDOUT_KEYS, STEP_KEYS, SYNTHETIC_KEYS, plot_metrics, plot_summary


def test_step_metrics_are_the_schema():
    logps = torch.tensor([-3.0, -4.0, -2.0, -5.0])
    loss, metrics = spin_loss(logps[0::2], logps[1::2], logps[0::2] - 1, logps[1::2] + 1, beta=0.1)
    assert {"loss", *metrics} == set(STEP_KEYS)


def test_iteration_metrics_are_the_schema():
    pairs = [{"ref_logps": [-3.0, -4.0]}, {"ref_logps": [-2.0, -2.5]}]
    assert set(heldout_metrics([(-2.5, -4.5), (-2.0, -2.0)], pairs, 0.1, [3, 2])) == set(HELDOUT_KEYS)
    rows = [{"synthetic": "abca", "synthetic_tokens": 4, "finished": True},
            {"synthetic": "abca", "synthetic_tokens": 4, "finished": False}]
    assert set(synthetic_stats(rows, demo_tokenizer())) == set(SYNTHETIC_KEYS)


def test_plots_draw_the_schema(tmp_path):
    pytest.importorskip("matplotlib")
    steps = [{"step": s, "lr": 1e-3, "grad_norm": 1.0, **dict.fromkeys(STEP_KEYS, -float(s))} for s in (1, 2)]
    assert plot_metrics(steps, str(tmp_path / "m.png")) and (tmp_path / "m.png").stat().st_size > 0
    its = [{"iteration": t, "loss last": 0.5, "accuracy": 0.6, **dict.fromkeys(HELDOUT_KEYS + SYNTHETIC_KEYS, 0.5)}
           for t in (0, 1)]
    assert plot_summary(its, str(tmp_path / "s.png")) and (tmp_path / "s.png").stat().st_size > 0
