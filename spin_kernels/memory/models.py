"""Model shapes for the memory planner: presets, config.json files, parameter counts.

Only the shape matters (no weights are read). Presets are the published configs of the models
(their config.json on the Hugging Face hub, copied here so the planner works offline).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer with RMSNorm, rotary attention (GQA) and a gated MLP."""

    name: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None
    qkv_bias: bool = False

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.dim_head

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): num_kv_heads * head_dim."""
        return self.num_kv_heads * self.dim_head

    @property
    def layer_params(self) -> int:
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * h * i + 2 * h  # gate/up/down, two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        """One [vocab, hidden] matrix (the embeddings; the lm_head too when untied)."""
        return self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """Everything outside the decoder layers: embeddings, final norm, lm_head if untied."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + self.root_params

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear maps of one layer, in Hugging Face order: q, k, v, o, gate,
        up, down."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def layer_linear_params(self) -> int:
        """Weights of one layer's linear maps (what NF4 quantizes)."""
        return sum(a * b for a, b in self.linear_shapes())

    def lora_params(self, rank: int) -> int:
        """LoRA adapter parameters on all seven linear maps of every layer."""
        return self.num_layers * sum(rank * (a + b) for a, b in self.linear_shapes())

    def tensor_sizes(self, lora_rank: int = 0) -> list[int]:
        """Element counts of the trainable tensors in ``model.parameters()`` order: every parameter
        (embeddings, each layer's q/k/v/o, gate/up/down, two norms, the final norm, lm_head), or
        with ``lora_rank`` each adapted map's lora_A [r, in] then lora_B [out, r]."""
        if lora_rank:
            return [n for _ in range(self.num_layers) for a, b in self.linear_shapes()
                    for n in (lora_rank * a, b * lora_rank)]
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        bias = {0: q, 1: kv, 2: kv} if self.qkv_bias else {}
        layer = []
        for j, (a, b) in enumerate(self.linear_shapes()):
            layer += [a * b] + ([bias[j]] if j in bias else [])
        layer += [h, h]  # input_layernorm, post_attention_layernorm
        head = [] if self.tied else [self.vocab * h]
        return [self.vocab * h] + layer * self.num_layers + [h] + head


PRESETS: dict[str, ModelSpec] = {
    "llama3-8b": ModelSpec("llama3-8b", 32, 4096, 14336, 32, 8, 128256),
    "llama3-70b": ModelSpec("llama3-70b", 80, 8192, 28672, 64, 8, 128256),
    "qwen2.5-72b": ModelSpec("qwen2.5-72b", 80, 8192, 29568, 64, 8, 152064, qkv_bias=True),
    "mistral-7b": ModelSpec("mistral-7b", 32, 4096, 14336, 32, 8, 32000),
    "llama2-7b": ModelSpec("llama2-7b", 32, 4096, 11008, 32, 32, 32000),
    "llama2-70b": ModelSpec("llama2-70b", 80, 8192, 28672, 64, 8, 32000),
}


def spec_from_config(config, name: str = "custom") -> ModelSpec:
    """A ModelSpec from a transformers config object or a config.json dict."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else \
        (lambda k, d=None: getattr(config, k, d))
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if get(k) is None]
    if missing:
        raise ValueError(f"config of {name!r} lacks {missing}: not a decoder-only LM config the planner knows")
    heads = int(get("num_attention_heads"))
    model_type = get("model_type", "")
    return ModelSpec(
        name=name,
        num_layers=int(get("num_hidden_layers")),
        hidden=int(get("hidden_size")),
        intermediate=int(get("intermediate_size")),
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads") or heads),
        vocab=int(get("vocab_size")),
        tied=bool(get("tie_word_embeddings", False)),
        head_dim=get("head_dim"),
        qkv_bias=bool(get("attention_bias", model_type == "qwen2")),
    )


def resolve_model(model: str | ModelSpec | dict) -> ModelSpec:
    """A preset name, a config.json path (or its directory), a config dict, or a ModelSpec."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, dict):
        return spec_from_config(model)
    if model in PRESETS:
        return PRESETS[model]
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) nor a config.json path")
    with open(path) as f:
        try:
            config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            data = " (a JSONL data file? data goes to --data)" if path.endswith((".jsonl", ".json")) else ""
            raise ValueError(f"model {model!r} is not a config.json: not one JSON object ({exc}){data}; give a "
                             f"preset ({', '.join(PRESETS)}), a model directory or its config.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"model {model!r} is not a config.json (a JSON {type(config).__name__}, not an object); give "
                         f"a preset ({', '.join(PRESETS)}), a model directory or its config.json")
    return spec_from_config(config, name=os.path.basename(os.path.dirname(os.path.abspath(path))))
