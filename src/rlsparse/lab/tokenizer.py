"""A character-level Hugging Face tokenizer built locally with the ``tokenizers`` library."""

from __future__ import annotations

import string

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
DEFAULT_ALPHABET = string.digits + "+-*=  .,?abcdefghijklmnopqrstuvwxyz"


def build_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A character-level ``PreTrainedTokenizerFast`` with pad/bos/eos/unk tokens.

    Every character of ``alphabet`` is one token (a BPE model with no merges), so the
    tokenizer saves and loads like any downloaded one. No special tokens are added on
    encode: prompts are plain text and TRL appends EOS where it needs it.

    Args:
        alphabet: The characters of the vocabulary (duplicates are ignored).

    Returns:
        transformers.PreTrainedTokenizerFast with left padding (for generation).

    Example:
        >>> tok = build_tokenizer()
        >>> tok("12+34=")["input_ids"][:2]
        [5, 6]
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  unk_token=UNK, padding_side="left", model_max_length=64)
    return tok
