"""What a tensor name means: wrapper prefixes, layer index, matrix type.

Recognises Llama/Mistral/Qwen2/Gemma names (``model.layers.N.self_attn.q_proj.weight``),
GPT-2 names (``transformer.h.N.attn.c_attn.weight``) and DeepSeek-V3 MoE names
(``model.layers.N.mlp.experts.E.gate_proj.weight``, ``shared_experts``, ``mlp.gate``).
"""

from __future__ import annotations

import re

# Wrappers that prefix names (DDP, torch.compile, TRL value heads, PPO policies, PEFT), and those
# that insert a segment anywhere (FSDP1, activation checkpointing).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "pretrained_model.", "policy.", "base_model.model.")
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.\d+\.")

# module name (the component before .weight/.bias) -> matrix type
_TYPES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "q_a_proj": "q_a", "q_b_proj": "q_b", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "dense": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
    "w1": "gate", "w3": "up", "w2": "down", "c_fc": "up", "fc1": "up", "fc2": "down",
    "embed_tokens": "embed", "wte": "embed", "word_embeddings": "embed", "tok_embeddings": "embed",
    "wpe": "pos_embed", "lm_head": "lm_head", "embed_out": "lm_head", "output": "lm_head",
}


def strip_prefixes(name: str) -> tuple[str, str]:
    """Remove wrapper segments; returns (clean name, what was removed from the front)."""
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    removed = ""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                removed += p
                changed = True
    return name, removed


def layer_of(name: str) -> int | None:
    """Transformer block index, or None for tensors outside the blocks (embeddings, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def type_of(name: str) -> str:
    """Matrix type: q, k, v, o, gate, up, down, norm, embed, lm_head, router, experts.* ..."""
    parts = name.split(".")
    leaf = parts[-1]
    module = parts[-2] if len(parts) >= 2 else leaf
    if leaf in ("weight_scale_inv", "weight_scale"):
        return "scale"
    if name == "lm_head.weight" or module == "lm_head":
        return "lm_head"
    if "norm" in module or module.startswith("ln") or module in ("ln_f", "ln_1", "ln_2"):
        return "norm"
    if leaf == "e_score_correction_bias" or (module == "gate" and ".mlp." in f".{name}"):
        return "router"
    if module == "router" or module.endswith("router"):
        return "router"
    if parts[0] == "transformer" and module == "c_proj" and len(parts) >= 3:
        t = "o" if parts[-3] == "attn" else "down"
    else:
        t = _TYPES.get(module, module)
    if ".shared_experts." in f".{name}":
        return f"shared_experts.{t}"
    if _EXPERT.search(f".{name}"):
        return f"experts.{t}"
    return t


# display order for tables and heatmaps; unknown types follow alphabetically
TYPE_ORDER = ["embed", "pos_embed", "q", "k", "v", "qkv", "q_a", "q_b", "kv_a", "kv_b", "o", "gate", "up",
              "gate_up", "down", "router", "experts.gate", "experts.up", "experts.down",
              "shared_experts.gate", "shared_experts.up", "shared_experts.down", "norm", "lm_head"]


def type_sort_key(t: str) -> tuple[int, str]:
    return (TYPE_ORDER.index(t), "") if t in TYPE_ORDER else (len(TYPE_ORDER), t)
