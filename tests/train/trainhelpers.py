"""Tiny models, tokenizer and datasets built in process: nothing is downloaded."""

from __future__ import annotations

import torch

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)] + [str(i) for i in range(10)] + [
    "answer", "is", "what", "plus", "yes", "no", "good", "bad", "the", "a"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = None
    return fast


def make_model(dtype=torch.float32, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.pad_token_id = 0
    return model


def random_mask(model, density=0.3, seed=1):
    """A mask over the model's checkpoint names (what `rlsparse diff` would write)."""
    from rlsparse.masks import Mask

    g = torch.Generator().manual_seed(seed)
    return Mask.from_tensors({n: torch.rand(p.shape, generator=g) < density for n, p in model.state_dict().items()})


def ones_mask(model):
    from rlsparse.masks import Mask

    return Mask.from_tensors({n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.state_dict().items()})


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def int_view(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_masked_training(before, model, mask):
    """Masked-out elements bit-identical, and some masked-in element changed."""
    moved_in = 0
    for n, p in model.named_parameters():
        keep = ~mask.get(n)
        a, b = int_view(before[n]), int_view(p.detach())
        assert torch.equal(a[keep], b[keep]), f"{n}: masked-out elements moved"
        moved_in += int((a[~keep] != b[~keep]).sum())
    assert moved_in > 0, "no masked-in element changed"
