"""Plain supervised fine-tuning for the demo: the weak starting point and the SFT control.

Deliberately the textbook path (right-padded batches, the model's own forward with ``labels``,
prompt tokens masked), so the control shares no code with the SPIN trainer it is compared with.
"""

from __future__ import annotations

import torch

from spin_kernels.packing import tokenize_prompt, tokenize_response


def _padded(tokenizer, rows: list[dict], max_prompt_length: int = 64,
            max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs, labels = [], []
    for r in rows:
        p = tokenize_prompt(tokenizer, r["prompt"], max_prompt_length=max_prompt_length)
        y = tokenize_response(tokenizer, r["real"])
        if max_length is not None:  # a cut response loses its EOS, as in tokenize_example
            y = y[:max(0, max_length - len(p))]
        seqs.append(p + y)
        labels.append([-100] * len(p) + y)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)], lab[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), torch.tensor(l), 1
    return ids, mask, lab


def sft_train(model, tokenizer, rows: list[dict], *, steps: int, batch_size: int, lr: float, seed: int,
              warmup_steps: int = 0, max_prompt_length: int = 64, max_length: int | None = None) -> list[float]:
    """``steps`` AdamW steps of next-token cross-entropy on the responses (mean over response
    tokens), cycling through seeded permutations of ``rows``; returns the per-step losses.
    Prompts keep their last ``max_prompt_length`` tokens; with ``max_length``, responses are cut
    so that prompt + response fit it."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
    model.train()
    order: list[int] = []
    losses = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        ids, mask, lab = _padded(tokenizer, [rows[i] for i in idx], max_prompt_length, max_length)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def response_nll(model, tokenizer, rows: list[dict], *, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy of the real responses (nats per response token)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            ids, mask, lab = _padded(tokenizer, rows[start:start + batch_size])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
            target = lab[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total, count = total + float(loss), count + int((target != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def early_stopped_sft(model, tokenizer, train: list[dict], val: list[dict], *, max_steps: int, batch_size: int,
                      lr: float, seed: int, eval_every: int = 10, patience: int = 3) -> dict:
    """SFT with early stopping on the validation rows: ``eval_every`` steps at a time (one AdamW
    run, its state kept across chunks), keeping the weights of the best validation NLL; stops
    after ``patience`` evaluations without improvement or at ``max_steps``. The model ends with
    the best weights. Returns ``{"steps": best step, "val_nll": ..., "curve": [(step, nll)]}``."""
    import copy

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    order: list[int] = []
    best = (response_nll(model, tokenizer, val), 0, copy.deepcopy(model.state_dict()))
    curve, bad, step = [(0, best[0])], 0, 0
    while step < max_steps and bad < patience:
        for _ in range(min(eval_every, max_steps - step)):
            if len(order) < batch_size:
                order += torch.randperm(len(train), generator=g).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            ids, mask, lab = _padded(tokenizer, [train[i] for i in idx])
            model(input_ids=ids, attention_mask=mask, labels=lab).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        nll = response_nll(model, tokenizer, val)
        curve.append((step, nll))
        if nll < best[0] - 1e-4:
            best, bad = (nll, step, copy.deepcopy(model.state_dict())), 0
        else:
            bad += 1
    model.load_state_dict(best[2])
    return {"steps": best[1], "val_nll": best[0], "curve": curve}
