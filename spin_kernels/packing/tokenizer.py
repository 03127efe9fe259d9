"""A small byte-level BPE tokenizer trained offline, for tests, demos and packer statistics.

Nothing is downloaded: the tokenizer is trained with the ``tokenizers`` library on the text it
is given (deterministic for the same texts and vocab size) and wrapped as a transformers
``PreTrainedTokenizerFast`` with a Zephyr-like chat template::

    <|user|>\\n{content}<|end|>\\n ... <|assistant|>\\n

``<|end|>`` closes every turn and is the EOS token, so a response "+ EOS" is a complete turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

#: The UltraChat-200k sample (MIT) shipped with the repository's tests.
ULTRACHAT_SAMPLE = Path(__file__).resolve().parents[2] / "tests" / "data" / "ultrachat_sample.jsonl"


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2):
    """Train a byte-level BPE on ``texts`` and return it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training text (an iterable of str, read once).
        vocab_size: the target vocabulary size (>= 256 + len(SPECIAL_TOKENS)); a small corpus may
            yield fewer tokens.
        min_frequency: pairs seen fewer times are not merged.

    Returns:
        PreTrainedTokenizerFast with eos = ``<|end|>``, pad = ``<|pad|>`` (no BOS) and the chat template
        above. Every byte sequence is encodable (byte-level), so no unknown token is needed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum} (bytes + special tokens), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
                                      clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def load_ultrachat_sample(path: str | Path | None = None) -> list[dict]:
    """The rows ``{"prompt": str, "real": str}`` of the UltraChat sample (default: the repository copy)."""
    path = Path(path) if path is not None else ULTRACHAT_SAMPLE
    if not path.is_file():
        raise FileNotFoundError(f"UltraChat sample not found at {path}; pass its path explicitly")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=4)
def _sample_tokenizer(path: str, vocab_size: int):
    rows = load_ultrachat_sample(path)
    return build_bpe_tokenizer((t for r in rows for t in (r["prompt"], r["real"])), vocab_size)


def sample_tokenizer(vocab_size: int = 4096, path: str | Path | None = None):
    """The BPE tokenizer trained on the UltraChat sample (trained once per process, then cached).

    Treat the result as read-only: it is shared by every caller in the process.
    """
    return _sample_tokenizer(str(Path(path) if path is not None else ULTRACHAT_SAMPLE), vocab_size)
