"""The demo's character-level tokenizer and tiny Llama-architecture model (built from configs)."""

from __future__ import annotations

import torch

PAD, EOS, SEP = "<pad>", "<eos>", ">"
#: The prompt is rendered as its characters followed by SEP; the response follows SEP directly.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}>{% endif %}")


def char_tokenizer(symbols: str):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``symbols`` (+ pad, eos, '>').

    WordLevel over single characters (a regex pre-tokenizer isolates every character) and a
    ``Fuse`` decoder, so ``decode(encode(text)) == text`` exactly: synthetic responses re-tokenise
    to the very ids that were sampled.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(symbols + SEP))
    vocab = {PAD: 0, EOS: 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                      clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_llama(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate_size: int = 128, max_positions: int = 64, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` (float32) from a config; seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def demo_tokenizer(alphabet: str = "abcdefgh"):
    """The demo's tokenizer: chain digits, the response alphabet, '>' , pad and eos."""
    return char_tokenizer("0123456789" + alphabet)


def save_tiny_model(path: str, *, alphabet: str = "abcdefgh", hidden_size: int = 32, layers: int = 1,
                    seed: int = 0) -> str:
    """Write a random tiny Llama and the demo tokenizer to ``path`` (save_pretrained, safetensors):
    a starting model for tests and examples, built without any download."""
    tok = demo_tokenizer(alphabet)
    model = tiny_llama(len(tok), hidden_size=hidden_size, layers=layers, intermediate_size=2 * hidden_size,
                       seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
