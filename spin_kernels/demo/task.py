"""A toy language whose data distribution p_data is known exactly: random Markov chains.

The prompt names a chain ``k`` (one of ``num_chains``) and a start letter ``s``, e.g. ``"2c"``.
The response is sampled from chain k starting in state s: at every step, in state c (the last
letter, or s before the first one), the next symbol is drawn from the row ``T_k[c]`` over
``alphabet + [EOS]``; after ``max_len`` letters EOS is forced. So, for a response
``y = y_1 .. y_L`` (letters) followed by EOS,

    p_data(y | x) = prod_{t=1..L+1} P_t(y_t),   P_t = T_k[y_{t-1}] (y_0 = s), or EOS-only if t > max_len.

Sequence-level KL on held-out samples (what the demo reports). By the chain rule,

    KL(p_data(.|x) || p_theta(.|x)) = E_{y ~ p_data(.|x)} [ sum_{t=1..L+1} KL(P_t || Q_t) ],

where ``Q_t = p_theta(. | x, y_<t)`` is the model's full next-token softmax (its whole
vocabulary: mass on pad, digits or the separator counts against it). Every inner term is computed
exactly from the two distributions; only the outer expectation is a Monte Carlo average over
held-out samples ``(x, y) ~ p_data`` with x uniform over the prompts. This estimator is unbiased
and has less variance than averaging ``log p_data(y|x) - log p_theta(y|x)``; it is reported in
nats per sequence together with its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MarkovTask:
    """``num_chains`` random chains over ``alphabet``; rows of T ~ Dirichlet(concentration) over
    the letters, then EOS gets probability ``stop_prob`` in every state."""

    num_chains: int = 4
    alphabet: str = "abcdefgh"
    concentration: float = 0.3
    stop_prob: float = 0.1
    max_len: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_chains <= 10:
            raise ValueError(f"num_chains must be in 1..10 (one digit names a chain), got {self.num_chains}")
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet.isalpha():
            raise ValueError(f"alphabet must be distinct letters, got {self.alphabet!r}")
        import numpy as np

        a = len(self.alphabet)
        rng = np.random.default_rng(self.seed)
        letters = torch.from_numpy(rng.dirichlet([self.concentration] * a, size=(self.num_chains, a)))
        #: [K, A, A+1] float64: P(next = letter j or EOS (last column) | chain k, state i).
        self.T = torch.cat([letters * (1 - self.stop_prob), torch.full((self.num_chains, a, 1), self.stop_prob,
                                                                         dtype=torch.float64)], -1)

    # -- prompts and sampling -------------------------------------------------------------

    @property
    def prompts(self) -> list[str]:
        return [f"{k}{s}" for k in range(self.num_chains) for s in self.alphabet]

    def parse(self, prompt: str) -> tuple[int, int]:
        """(chain, start state) of a prompt such as ``"2c"``."""
        if len(prompt) != 2 or not prompt[0].isdigit() or prompt[1] not in self.alphabet:
            raise ValueError(f"not a prompt of this task: {prompt!r}")
        return int(prompt[0]), self.alphabet.index(prompt[1])

    def sample(self, n: int, seed: int) -> list[dict]:
        """``n`` rows ``{prompt, real}``, prompts uniform, responses from p_data (seeded)."""
        g = torch.Generator().manual_seed(seed)
        prompts = self.prompts
        rows = []
        for pi in torch.randint(0, len(prompts), (n,), generator=g).tolist():
            k, state = self.parse(prompts[pi])
            out = []
            while len(out) < self.max_len:
                nxt = int(torch.multinomial(self.T[k, state], 1, generator=g))
                if nxt == len(self.alphabet):
                    break
                out.append(self.alphabet[nxt])
                state = nxt
            rows.append({"prompt": prompts[pi], "real": "".join(out)})
        return rows

    def state_rows(self, prompt: str, response: str) -> list[int]:
        """For t = 1..L+1 along ``response``, the row of ``self.table`` holding P_t."""
        k, state = self.parse(prompt)
        a = len(self.alphabet)
        rows = []
        for t in range(len(response) + 1):
            rows.append(self.num_chains * a if t == self.max_len else k * a + state)
            if t < len(response):
                state = self.alphabet.index(response[t])
        return rows

    @property
    def table(self) -> torch.Tensor:
        """``[K*A + 1, A+1]`` float64: row k*A + i = T[k, i]; the last row is the forced EOS."""
        a = len(self.alphabet)
        forced = torch.zeros(1, a + 1, dtype=torch.float64)
        forced[0, a] = 1.0
        return torch.cat([self.T.reshape(-1, a + 1), forced])

    def next_distributions(self, prompt: str, response: str) -> torch.Tensor:
        """``[L+1, A+1]`` float64: P_t for t = 1..L+1 (letters then EOS) along ``response``."""
        return self.table[self.state_rows(prompt, response)]

    def log_prob(self, prompt: str, response: str) -> float:
        """log p_data(response + EOS | prompt)."""
        dist = self.next_distributions(prompt, response)
        idx = [self.alphabet.index(c) for c in response] + [len(self.alphabet)]
        return float(torch.log(dist[torch.arange(len(idx)), torch.tensor(idx)]).sum())

    def entropy_estimate(self, rows: list[dict]) -> float:
        """Mean of -log p_data(y|x) over ``rows`` (the best achievable cross-entropy per sequence)."""
        return -sum(self.log_prob(r["prompt"], r["real"]) for r in rows) / len(rows)


@torch.no_grad()
def sequence_kl(model, tokenizer, task: MarkovTask, rows: list[dict], *, batch_size: int = 256) -> tuple[float, float]:
    """(mean, standard error) of the per-sequence KL(p_data || p_theta) over held-out ``rows``
    (see the module docstring), in nats."""
    from spin_kernels.packing import tokenize_prompt, tokenize_response

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    symbol_ids = torch.tensor([tokenizer.convert_tokens_to_ids(c) for c in task.alphabet] + [tokenizer.eos_token_id])
    table = task.table
    # sum_v p log p per table row (0 log 0 = 0), computed once.
    neg_entropy = torch.where(table > 0, table * table.clamp_min(1e-300).log(), torch.zeros_like(table)).sum(-1)
    per_seq: list[torch.Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            seqs, spans, states = [], [], []
            for r in chunk:
                p = tokenize_prompt(tokenizer, r["prompt"], max_prompt_length=64)
                y = tokenize_response(tokenizer, r["real"])
                seqs.append(p + y)
                # rows predicting y_1 .. y_{L+1}: positions len(p)-1 .. len(p)+L-1
                spans.append((len(p) - 1, len(y)))
                states.append(task.state_rows(r["prompt"], r["real"]))
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logq = torch.log_softmax(logits.double(), -1).cpu()
            # Gather every counted position of the chunk at once: [M, A+1] model log-probs and
            # the matching true rows; KL_t = sum_v p log p - sum_v p log q.
            seq_of = torch.cat([torch.full((n,), i) for i, (_, n) in enumerate(spans)])
            pos = torch.cat([torch.arange(f, f + n) for f, n in spans])
            st = torch.tensor([s for row in states for s in row])
            lq = logq[seq_of, pos][:, symbol_ids]
            kl_t = neg_entropy[st] - (table[st] * lq).sum(-1)
            per_seq.append(torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, seq_of, kl_t))
    finally:
        model.train(was_training)
    values = torch.cat(per_seq)
    se = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se
