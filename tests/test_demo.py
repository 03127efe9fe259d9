"""The embedded demo: the known distribution, the exact KL, the tokenizer, and a miniature run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from spin_kernels.demo.task import MarkovTask, sequence_kl
from spin_kernels.demo.tiny import demo_tokenizer

TASK = MarkovTask(num_chains=3, alphabet="abcde", max_len=6, stop_prob=0.2, seed=1)
TOK = demo_tokenizer(TASK.alphabet)


def test_tokenizer_round_trip_and_specials():
    text = "2c>abcde"
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and TOK.decode(ids) == text
    assert TOK.eos_token == "<eos>" and TOK.pad_token == "<pad>" and TOK.pad_token_id != TOK.eos_token_id


def test_task_distribution():
    assert torch.allclose(TASK.T.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    rows = TASK.sample(300, seed=0)
    assert all(len(r["real"]) <= TASK.max_len for r in rows)
    assert any(len(r["real"]) == TASK.max_len for r in rows)  # the cap is reached and forces EOS
    assert TASK.sample(5, seed=3) == TASK.sample(5, seed=3)
    # log p_data of one sample, by hand
    r = rows[0]
    k, s = TASK.parse(r["prompt"])
    want, state = 0.0, s
    for ch in r["real"]:
        want += math.log(TASK.T[k, state, TASK.alphabet.index(ch)])
        state = TASK.alphabet.index(ch)
    want += 0.0 if len(r["real"]) == TASK.max_len else math.log(TASK.T[k, state, -1])
    assert TASK.log_prob(r["prompt"], r["real"]) == pytest.approx(want, abs=1e-12)


class MixtureOracle(torch.nn.Module):
    """A 'model' whose next-token distribution is (1 - eps) p_data + eps uniform over the vocabulary."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.symbols = [TOK.convert_tokens_to_ids(c) for c in TASK.alphabet] + [TOK.eos_token_id]
        self.letters = {TOK.convert_tokens_to_ids(c): i for i, c in enumerate(TASK.alphabet)}

    def forward(self, input_ids, attention_mask):
        b, n = input_ids.shape
        v = len(TOK)
        probs = torch.full((b, n, v), self.eps / v, dtype=torch.float64)
        for i in range(b):
            k = int(TOK.convert_ids_to_tokens(int(input_ids[i, 0])))
            state = self.letters[int(input_ids[i, 1])]
            for pos in range(2, n):  # position 2 is '>', then the letters of the response
                if pos > 2:
                    tok = int(input_ids[i, pos])
                    if tok not in self.letters:
                        break
                    state = self.letters[tok]
                t = pos - 2
                row = TASK.table[-1] if t == TASK.max_len else TASK.T[k, state]
                probs[i, pos, self.symbols] += (1 - self.eps) * row
        return SimpleNamespace(logits=probs.log())


def _brute_force_kl(rows, eps):
    """sum_t KL(P_t || (1-eps) P_t + eps/V) along each sample, walking the chain by hand."""
    v = len(TOK)
    total = 0.0
    for r in rows:
        k, state = TASK.parse(r["prompt"])
        for t in range(len(r["real"]) + 1):
            p = TASK.table[-1] if t == TASK.max_len else TASK.T[k, state]
            for pv in p.tolist():
                if pv > 0:
                    total += pv * math.log(pv / ((1 - eps) * pv + eps / v))
            if t < len(r["real"]):
                state = TASK.alphabet.index(r["real"][t])
    return total / len(rows)


def test_sequence_kl_is_exact_per_token():
    rows = TASK.sample(40, seed=5)
    mean, se = sequence_kl(MixtureOracle(0.3), TOK, TASK, rows, batch_size=16)
    assert mean == pytest.approx(_brute_force_kl(rows, 0.3), rel=1e-10) and se > 0
    assert abs(sequence_kl(MixtureOracle(1e-12), TOK, TASK, rows)[0]) < 1e-9


def test_sequence_kl_agrees_with_the_log_ratio_estimator():
    """Both estimate KL(p_data || p_theta): the per-token form must match the plain Monte Carlo
    mean of log p_data(y) - log p_theta(y) up to sampling noise (same samples, a real model)."""
    from spin_kernels.demo.tiny import tiny_llama
    from spin_kernels.packing import tokenize_prompt, tokenize_response

    model = tiny_llama(len(TOK), hidden_size=16, layers=1, intermediate_size=32).double()
    rows = TASK.sample(400, seed=6)
    kl, se = sequence_kl(model, TOK, TASK, rows)
    seqs = [(tokenize_prompt(TOK, r["prompt"]), tokenize_response(TOK, r["real"])) for r in rows]
    width = max(len(p) + len(y) for p, y in seqs)
    ids = torch.full((len(rows), width), TOK.pad_token_id)
    for i, (p, y) in enumerate(seqs):
        ids[i, :len(p) + len(y)] = torch.tensor(p + y)
    with torch.no_grad():  # right padding: the causal model never looks at it
        logq = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    ratios = torch.tensor([
        TASK.log_prob(r["prompt"], r["real"])
        - float(logq[i, len(p) - 1:len(p) + len(y) - 1].gather(-1, torch.tensor(y).unsqueeze(-1)).sum())
        for i, (r, (p, y)) in enumerate(zip(rows, seqs))])
    mc, mc_se = float(ratios.mean()), float(ratios.std() / math.sqrt(len(ratios)))
    assert abs(kl - mc) < 4 * math.hypot(se, mc_se)
    assert se < mc_se  # the per-token form is the lower-variance one


def terminal_lines(out: str, err: str) -> list[str]:
    """What a terminal shows of the two streams: per line, the text after its last carriage
    return (progress bars redraw in place and, left by ``leave=False``, end blank)."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for text in (out, err) for line in text.split("\n")]
    return [line for line in lines if line]


def _recorded_seed(seed: int, iterations: int = 4) -> dict:
    """One seed's result rows, shaped as the demo's ``_run_seed`` returns them (numbers of the
    size the real demo prints)."""
    kl = lambda x: (x, 0.0123456)  # noqa: E731 - (mean, se over the test samples)
    rows = [{"iteration": "SFT start", "KL SPIN": kl(1.5 + seed / 10), "val KL SPIN": 1.51,
             "KL SFT-control": kl(1.5 + seed / 10), "KL SFT-control (SPIN lr)": kl(1.5 + seed / 10),
             "val KL SFT-control": 1.51, "val KL SFT-control (SPIN lr)": 1.51}]
    for t in range(iterations):
        rows.append({"iteration": t, "KL SPIN": kl(1.5 + seed / 10 - 0.0123 * (t + 1)), "val KL SPIN": 1.4,
                     "KL SFT-control": kl(1.5 + seed / 10 - 0.001 * t), "KL SFT-control (SPIN lr)": kl(1.5 + seed / 10),
                     "val KL SFT-control": 1.5, "val KL SFT-control (SPIN lr)": 1.5,
                     "heldout accuracy": 0.7 - 0.05 * t, "heldout margin": 0.123456, "loss": 0.5234, "accuracy": 0.81,
                     "logp real": -12.3456, "logp synthetic": -14.5678, "synthetic len": 7.891})
    return {"seed": seed, "rows": rows, "sft": {"steps": 350, "val_nll": 1.2345}, "entropy": 9.8765,
            "stop": 2 if seed != 1 else None}


@pytest.mark.parametrize("seeds", [1, 3])
def test_demo_comparison_fits_a_terminal(tmp_path, seeds):
    """The demo's verdict on recorded rows of the real demo's shape (3 seeds x 4 iterations, and
    one seed): a short table of SPIN against the controls with the spread, held-out accuracy, the
    stopping rule and the paths of the full tables, in lines of at most 160 characters."""
    from spin_kernels.demo.run import DemoConfig, _aggregate, comparison

    per_seed = [_recorded_seed(s) for s in range(seeds)]
    text = comparison(_aggregate(per_seed), per_seed, DemoConfig(), str(tmp_path / "runs" / "demo"), 123.4)
    lines = text.splitlines()
    assert len(lines) <= 20 and max(map(len, lines)) <= 160, text
    assert "Δ KL SPIN" in text and "Δ KL SFT control (SPIN lr)" in text and "held-out acc" in text
    assert (" -0.049 ± 0.000 |" if seeds == 3 else " -0.049 |") in text  # the change at iteration 3 (its spread)
    assert "lowest KL: iteration 3" in text
    stops = "seed 0 after iteration 2, seed 1 never, seed 2 after iteration 2" if seeds == 3 else \
        "seed 0 after iteration 2"
    assert f"stopping rule (held-out accuracy < 0.55): {stops}" in text
    assert str(tmp_path / "runs" / "demo" / "results.md") in text


def test_miniature_demo_run(tmp_path, capsys, monkeypatch):
    from spin_kernels.cli import main

    monkeypatch.chdir(tmp_path)  # the output directory named as a user would (runs/demo by default)
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", "demo", "--iterations", "2", "--train-examples", "16", "--eval-examples",
            "40", "--sft-steps", "2", "--hidden-size", "16", "--global-batch-pairs", "8", "--epochs", "1",
            "--max-new-tokens", "8", "--threads", "1", "--seeds", "2"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["iteration"] for r in res["rows"]] == ["SFT start", 0, 1]
    assert [s["seed"] for s in res["per_seed"]] == [0, 1] and (out / "seed1" / "spin" / "iter1").is_dir()
    for i, r in enumerate(res["rows"]):
        assert r["KL SPIN"] > 0 and r["KL SFT-control"] > 0 and math.isfinite(r["KL SPIN se"])
        for key in ("KL SPIN", "KL SFT-control", "KL SFT-control (SPIN lr)"):  # means of the seeds' own changes
            changes = [s["rows"][i][key][0] - s["rows"][0][key][0] for s in res["per_seed"]]
            assert r[f"Δ {key}"] == pytest.approx(sum(changes) / 2)
            assert r[key] == pytest.approx(sum(s["rows"][i][key][0] for s in res["per_seed"]) / 2)
    assert res["rows"][0]["Δ KL SPIN"] == 0.0
    text = (out / "results.md").read_text()
    assert "KL SPIN" in text and "| SFT start |" in text and "KL SFT-control (SPIN lr)" in text  # the full table
    printed = capsys.readouterr()
    shown = terminal_lines(printed.out, printed.err)
    assert len(shown) <= 60 and max(map(len, shown)) <= 160, "\n".join(shown)
    assert "SPIN vs the controls" in printed.out and "demo/results.md" in printed.out
    assert sum(line.startswith("seed 1: iteration") for line in shown) == 2  # a line per seed and iteration
    assert (out / "seed0" / "spin" / "iter1" / "metrics.png").exists()
    assert main(argv) == 0  # a previous demo run in the same directory is replaced, not an error
