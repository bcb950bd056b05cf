"""GPT-2 written in plain ``torch.nn``, the reference fastdl's GPT is measured and tested against.

The same module names as :class:`fastdl.models.GPT` (so its ``state_dict`` loads unchanged), and
only stock PyTorch inside: ``F.scaled_dot_product_attention``, ``F.layer_norm``, ``F.gelu`` and
the logits formed in full for ``F.cross_entropy``. Dropout is left out: the comparisons run
without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdl.models.gpt2 import GPTConfig


class PlainAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=2)
        q, k, v = (z.view(b, t, self.n_head, e // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, e))


class PlainMLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class PlainBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=self.eps, bias=config.bias)
        self.attn = PlainAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=self.eps, bias=config.bias)
        self.mlp = PlainMLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    """``PlainGPT(config)(idx, targets)`` is the mean next-token cross-entropy (``-100`` ignored)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_ctx, config.n_embd),
                h=nn.ModuleList([PlainBlock(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def transformers_gpt2(model):
    """``transformers.GPT2LMHeadModel`` (SDPA attention) holding the weights of the fastdl GPT
    ``model``, or None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    hf_config = transformers.GPT2Config(**model.config.to_hf_config())
    hf_config._attn_implementation = "sdpa"
    hf = transformers.GPT2LMHeadModel(hf_config)
    hf.load_state_dict(model.to_hf_state_dict(), strict=False)  # the causal-mask buffers are not weights
    return hf.to(next(model.parameters()).device)
