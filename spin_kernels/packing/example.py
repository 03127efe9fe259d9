"""One SPIN example as token ids, and the tokenisation rules that produce it.

A SPIN example is a prompt with two responses: the real one (from the SFT data) and the
synthetic one (sampled from the opponent). Both sequences of a pair share the prompt tokens:

    sequence 2p   = prompt_ids + real_ids
    sequence 2p+1 = prompt_ids + synthetic_ids

Prompt format
    * The tokenizer has a chat template: the prompt is the conversation up to the assistant
      turn, rendered with ``add_generation_prompt=True`` (the template adds BOS if it wants one).
    * No chat template: the plain format ``"User: {content}\\n\\nAssistant:"`` per turn
      (``"System: "`` / ``"User: "`` / ``"Assistant: "`` prefixes, turns separated by a blank
      line), tokenised with the tokenizer's own special tokens (e.g. BOS). A response is then
      tokenised with a leading space so that it continues ``"Assistant:"`` naturally.

Responses are ``tokenizer(text, add_special_tokens=False)`` followed by ``eos_token_id``. A
text that already ends with the tokenizer's EOS text (``"...</s>"``) is tokenised without it:
one EOS either way, the tokens a synthetic response (decoded without special tokens) gets.

Truncation (``max_prompt_length < max_length`` is required)
    1. The prompt keeps its END: ``prompt_ids[-max_prompt_length:]`` (the last turn and the
       generation prompt matter most; early context is dropped first).
    2. Each response is cut to ``max_length - len(prompt_ids)`` tokens, keeping its start.
       A response cut this way loses its EOS: the EOS stays only if the whole response fits.
       This is deliberate: the model must not be taught to stop where the text was only cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Messages = Sequence[dict]


@dataclass
class SpinExample:
    """One tokenised SPIN pair.

    Attributes:
        prompt_ids: the prompt tokens (chat template applied, already truncated).
        real_ids: the real response tokens, ending with EOS unless truncated.
        synthetic_ids: the synthetic response tokens, same rules.
        ref_logps: (real, synthetic) reference log-probs of the two responses, when known.
        index: the position of the example in its source dataset (-1 if unknown).
    """

    prompt_ids: list[int]
    real_ids: list[int]
    synthetic_ids: list[int]
    ref_logps: tuple[float, float] | None = None
    index: int = -1

    @property
    def real_length(self) -> int:
        """Tokens of the real sequence (prompt + real response)."""
        return len(self.prompt_ids) + len(self.real_ids)

    @property
    def synthetic_length(self) -> int:
        """Tokens of the synthetic sequence (prompt + synthetic response)."""
        return len(self.prompt_ids) + len(self.synthetic_ids)

    @property
    def num_tokens(self) -> int:
        """The pair's token cost in a default packed batch: both sequences, the prompt counted twice
        (``packed_tokens(share_prompt=False)``)."""
        return self.real_length + self.synthetic_length

    def packed_tokens(self, share_prompt: bool = False) -> int:
        """The pair's tokens in ``pack_batch(..., share_prompt=share_prompt)``.

        Default layout: prompt + real + prompt + synthetic. Shared prompt: the prompt once, plus its
        last token a second time (it starts both branches; spin_kernels.packing.batch), i.e.
        ``len(prompt) + len(real) + len(synthetic) + 1`` (no extra token without a prompt).
        """
        if not share_prompt:
            return self.num_tokens
        return len(self.prompt_ids) + len(self.real_ids) + len(self.synthetic_ids) + min(len(self.prompt_ids), 1)


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) "
                         "so that every response keeps at least one token")


def _as_messages(prompt: Any) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if "role" not in m or "content" not in m:
                raise ValueError(f"prompt messages need 'role' and 'content' keys, got {sorted(m)}")
        if prompt[-1]["role"] == "assistant":
            raise ValueError("prompt must end before the assistant turn (its last message is from the assistant)")
        return list(prompt)
    raise TypeError(f"prompt must be a str or a non-empty list of chat messages, got {type(prompt).__name__}")


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_prompt(messages: list[dict]) -> str:
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


def tokenize_prompt(tokenizer, prompt: str | Messages, *, max_prompt_length: int = 512) -> list[int]:
    """The prompt token ids (what generation starts from), keeping the last ``max_prompt_length``.

    Args:
        tokenizer: a transformers tokenizer (fast or slow).
        prompt: a user message (str) or a chat ``messages`` list ending before the assistant turn.
        max_prompt_length: the most prompt tokens kept (>= 1); the start is dropped first.

    Returns:
        list[int] of length <= max_prompt_length.
    """
    if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be an int >= 1, got {max_prompt_length!r}")
    messages = _as_messages(prompt)
    if _has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(_plain_prompt(messages), add_special_tokens=True)["input_ids"]
    return list(ids[-max_prompt_length:])


def tokenize_response(tokenizer, response: str) -> list[int]:
    """Response token ids followed by EOS (no truncation); see the module docstring for the format."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: responses must end with EOS; set tokenizer.eos_token")
    eos_text = getattr(tokenizer, "eos_token", None)
    if isinstance(eos_text, str) and eos_text and response.endswith(eos_text):
        response = response[:-len(eos_text)]  # the EOS is added below, once
    text = response if _has_chat_template(tokenizer) else " " + response
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [int(eos)]


def truncate_response(response_ids: list[int], prompt_length: int, max_length: int) -> list[int]:
    """Keep the start of a response so that prompt + response <= max_length (EOS lost if cut)."""
    return response_ids[: max(0, max_length - prompt_length)]


def tokenize_example(
    tokenizer,
    prompt: str | Messages,
    real: str,
    synthetic: str,
    *,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    index: int = -1,
    ref_logps: tuple[float, float] | None = None,
) -> SpinExample:
    """Tokenise one (prompt, real, synthetic) triple under the module's format and truncation rules.

    Args:
        tokenizer: a transformers tokenizer with an ``eos_token_id``.
        prompt: a user message (str) or a chat ``messages`` list ending before the assistant turn.
        real, synthetic: the two responses as text (without EOS; it is added).
        max_length: the most tokens of prompt + response, per sequence.
        max_prompt_length: the most prompt tokens (< max_length).
        index: stored in ``SpinExample.index``.
        ref_logps: stored in ``SpinExample.ref_logps``.

    Returns:
        SpinExample with ``len(prompt_ids) <= max_prompt_length`` and each
        ``len(prompt_ids) + len(response_ids) <= max_length``.
    """
    _check_lengths(max_length, max_prompt_length)
    prompt_ids = tokenize_prompt(tokenizer, prompt, max_prompt_length=max_prompt_length)
    real_ids, synthetic_ids = (
        truncate_response(tokenize_response(tokenizer, text), len(prompt_ids), max_length)
        for text in (real, synthetic))
    return SpinExample(prompt_ids, real_ids, synthetic_ids, ref_logps=ref_logps, index=index)
