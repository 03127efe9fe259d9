"""vLLM (``generation.backend: vllm``): one engine for a whole generation stage (building one is
the expensive part), released before the stage returns so that training does not start next to
it. ``SamplingParams`` match the hf path: temperature, top_p, no top_k, max_new_tokens, one seed
per prompt (``example`` seeding). It loads the model itself (``uses_model`` is False) and runs
in one process (``one_process``).

Untested: vLLM does not install on the CPU machines this project is tested on.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..config import ConfigError
from ..data import Record
from . import SamplingOptions, example_seeds


class VllmSampler:
    """One vLLM engine on ``model_path`` for the stage; ``close()`` releases it (and its GPU memory)."""

    static_batches: ClassVar[bool] = False
    uses_model: ClassVar[bool] = False
    one_process: ClassVar[bool] = True

    def __init__(self, model, tokenizer, cfg: SamplingOptions, *, seed: int, model_path: str):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ConfigError("generation.backend: 'vllm' needs the vllm package (pip install spin_kernels[vllm])") \
                from exc
        self._params = SamplingParams
        self.cfg, self.seed = cfg, seed
        self.llm = LLM(model=model_path, seed=cfg.generation_seed)

    def sample(self, number: int, records: list[Record], prompt_ids: list[list[int]]) -> list[dict[str, Any]]:
        c = self.cfg
        params = [self._params(n=1, temperature=c.temperature, top_p=c.top_p, top_k=-1, max_tokens=c.max_new_tokens,
                               seed=s % (2**31)) for s in example_seeds(self.seed, records)]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)
        return [{"synthetic": o.outputs[0].text, "synthetic_tokens": len(o.outputs[0].token_ids),
                 "finished": o.outputs[0].finish_reason == "stop"} for o in outs]

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
