"""Did an iteration help? Held-out evaluation, synthetic-data statistics, the stopping rule's
input, and a user's own evaluation command.

Held-out pairs (``--eval-fraction F`` or ``--eval-data PATH``) never train. Each iteration the
opponent also answers their prompts (``iter{t}/heldout_generated.jsonl``) and scores them
(``iter{t}/heldout_pairs.jsonl``: the reference log-probs). After training, the new model scores
the same pairs, and with the iteration's β:

* ``heldout/accuracy``: the share of held-out pairs whose reward margin
  ``β[(log π(y) − log π_ref(y)) − (log π(y') − log π_ref(y'))]`` is positive: can the trained
  player tell the real response y from the opponent's y' on prompts it never trained on? At the
  game's fixed point (the model's distribution equals the data's) it cannot: 0.5.
* ``heldout/margin``: the mean margin;
* ``heldout/logp_real_per_token``: the new model's log-probability of the real responses per
  response token (higher: it models the data better).

Synthetic-data statistics of the iteration's training responses: ``synthetic/mean_tokens``,
``synthetic/finished`` (ended with EOS), ``synthetic/distinct2`` (distinct token bigrams / all
bigrams), ``synthetic/duplicates`` (share of responses identical to another one).

How to read iteration 0: its opponent against itself would be 50% by construction, so the
trained player is measured. A held-out accuracy well above 0.5 after iteration 0 says the model
still tells its own samples from the data, so SPIN has something to learn; close to 0.5 says the
starting model's samples already look like the data to it, and SPIN is unlikely to help.
"""

from __future__ import annotations

import math
import random
import shlex
import subprocess
from typing import Any


def split_heldout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records: a seeded ``fraction`` of the distinct prompts (at least one
    when fraction > 0) and every row with one of them go to the held-out side, so no held-out
    prompt is ever trained on. Rows keep their data index."""
    if fraction <= 0:
        return records, []
    keys = sorted({_prompt_key(r["prompt"]) for r in records})
    random.Random(seed).shuffle(keys)
    held = set(keys[:max(1, math.ceil(fraction * len(keys)))])
    if len(held) == len(keys):
        from .config import ConfigError

        raise ConfigError(f"loop.eval_fraction: --eval-fraction {fraction} holds out all {len(keys)} distinct "
                          f"prompt(s) of the {len(records)} row(s) (at least one is held out): nothing to train "
                          f"on; lower it or give more data")
    train = [r for r in records if _prompt_key(r["prompt"]) not in held]
    return train, [r for r in records if _prompt_key(r["prompt"]) in held]


def warn_heldout_overlap(records: list[dict], heldout: list[dict], data: str | None, eval_data: str) -> int:
    """Count the ``--eval-data`` rows whose prompt (by digest) is also a training prompt, and say
    so with the count: the held-out metrics on them score prompts the model trains on (a toy
    task with few prompts overlaps by design; a real evaluation set should not). Returns the
    count."""
    import sys

    from .parallel import is_main
    from .provenance import text_digest

    trained = {text_digest(r["prompt"]) for r in records}
    digests = [text_digest(r["prompt"]) for r in heldout]
    shared = [r.get("index", n) for n, (r, d) in enumerate(zip(heldout, digests)) if d in trained]
    if shared and is_main():
        distinct = len(set(digests) & trained)
        print(f"spin-kernels: warning: --eval-data {eval_data}: {len(shared)} of its {len(heldout)} row(s) ({distinct} "
              f"distinct prompt(s), e.g. rows {shared[:5]}) have a prompt that is also in the training data "
              f"{data or ''}; the held-out metrics on them score prompts the model trains on (new responses, not new "
              f"prompts). Remove those rows from one of the files for a measure on unseen prompts",
              file=sys.stderr)
    return len(shared)


def _prompt_key(prompt: Any) -> str:
    import json

    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def heldout_metrics(policy: list[tuple[float, float]], pairs: list[dict], beta: float,
                    real_tokens: list[int]) -> dict[str, float]:
    """The held-out metrics from the trained model's log-probs ``policy`` [(real, synthetic)] of
    ``pairs`` (with the opponent's ``ref_logps``), β, and the real responses' token counts."""
    margins = [beta * ((p[0] - r["ref_logps"][0]) - (p[1] - r["ref_logps"][1])) for p, r in zip(policy, pairs)]
    return {"heldout/accuracy": sum(m > 0 for m in margins) / len(margins),
            "heldout/margin": sum(margins) / len(margins),
            "heldout/logp_real_per_token": sum(p[0] for p in policy) / max(1, sum(real_tokens)),
            "heldout/pairs": len(margins)}


def synthetic_stats(rows: list[dict], tokenizer) -> dict[str, float]:
    """Statistics of generated rows (``synthetic``, ``synthetic_tokens``, ``finished``)."""
    from collections import Counter

    texts = [r["synthetic"] for r in rows]
    counts = Counter(texts)
    bigrams, distinct = 0, set()
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pairs = list(zip(ids, ids[1:]))
        bigrams += len(pairs)
        distinct.update(pairs)
    return {"synthetic/mean_tokens": sum(r["synthetic_tokens"] for r in rows) / len(rows),
            "synthetic/finished": sum(bool(r["finished"]) for r in rows) / len(rows),
            "synthetic/distinct2": len(distinct) / bigrams if bigrams else 0.0,
            "synthetic/duplicates": sum(n for n in counts.values() if n > 1) / len(rows)}


def run_eval_command(command: str, model_dir: str, timeout: float | None = None) -> dict[str, Any]:
    """Run ``command`` through the shell with ``{model}`` replaced by ``model_dir`` (quoted);
    returns ``{"eval/exit_code", "eval/last_line"}`` (the last non-empty line of its output)."""
    cmd = command.replace("{model}", shlex.quote(model_dir))
    try:
        res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"eval/exit_code": None, "eval/last_line": f"timed out after {timeout} s"}
    lines = [line for line in (res.stdout + "\n" + res.stderr if res.returncode else res.stdout).splitlines()
             if line.strip()]
    return {"eval/exit_code": res.returncode, "eval/last_line": lines[-1].strip() if lines else ""}
