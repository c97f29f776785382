"""Training a byte-level BPE tokenizer locally (the machines this project targets may not reach the Hub)."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer on `texts`.

    `<|endoftext|>` gets id 0 and serves as BOS, EOS and padding token, as in GPT-2 (padding positions are masked
    by the attention mask, so sharing the id is harmless).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + <|endoftext|> + 1 merge), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=None,
        model_max_length=1_000_000,
    )
