"""GPT-2 (Radford et al., 2019) on fastdl's kernels, with Hugging Face's module names.

Read top to bottom: the configuration and its presets, the three modules of a block (attention,
MLP, block), the model (forward, loss, generation with a KV cache), Hugging Face checkpoints,
and a sequence-classification head.

- Attention is :func:`fastdl.ops.attention` (fused, causal, no ``T x T`` scores).
- Each block is pre-norm, and its second LayerNorm also adds the attention output to the
  residual stream (:class:`fastdl.nn.LayerNorm` with ``residual=``), one pass instead of two.
- The loss is :func:`fastdl.ops.linear_cross_entropy` on the last hidden states and the tied
  embedding, so training never holds the ``[B, T, vocab]`` logits.
- The projections are :class:`fastdl.nn.Linear`: a decoding step's few rows (one per sequence)
  take its weight-streaming CPU kernel, which reads each weight once per step.
- The state_dict keys are Hugging Face's ``GPT2LMHeadModel`` keys (``transformer.h.0.attn.c_attn
  .weight``, ...); only the four projections that Hugging Face stores as ``Conv1D``
  (``in x out``) are ``nn.Linear`` here (``out x in``). :meth:`GPT.from_pretrained` and
  :meth:`GPT.to_hf_state_dict` transpose them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn import LayerNorm, Linear
from ..ops.attention import SUPPORTED_HEAD_DIMS

__all__ = ["GPTConfig", "GPT", "GPTClassifier", "KVCache", "sample_next_token"]


# ---- configuration ------------------------------------------------------------------------------

ACTIVATIONS = ("gelu_tanh", "gelu")  # GPT-2's tanh approximation ("gelu_new" in HF), nanoGPT's exact GELU

PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # small models for tests and CPU training: GPT-2's vocabulary, or UTF-8 bytes + <|endoftext|>
    "gpt2-tiny": dict(n_layer=4, n_head=4, n_embd=128, n_ctx=256),
    "bytes-tiny": dict(n_layer=4, n_head=4, n_embd=128, n_ctx=256, vocab_size=257),
}


@dataclass
class GPTConfig:
    """The shape of a GPT-2 model. ``GPTConfig.from_name("gpt2", dropout=0.1)`` starts from a
    preset (:data:`PRESETS`) and overrides fields.

    ``n_ctx`` is the context length (nanoGPT's ``block_size``, HF's ``n_positions``),
    ``n_inner`` the MLP width (default ``4 * n_embd``), ``dropout`` the probability used for the
    embeddings, the attention probabilities and both residual branches, ``bias`` whether the
    linear layers and LayerNorms have biases (GPT-2's do).
    """

    vocab_size: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_tanh"

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"GPTConfig: head dim n_embd / n_head = {self.head_dim} is not supported by fastdl.ops.attention "
                "(multiples of 8 from 8 to 256)"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def block_size(self) -> int:
        """nanoGPT's name for :attr:`n_ctx`."""
        return self.n_ctx

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """A preset (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ``gpt2-tiny``,
        ``bytes-tiny``) with ``overrides`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf_config(cls, hf: Mapping, **overrides) -> GPTConfig:
        """From the fields of a Hugging Face ``GPT2Config`` (its ``config.json``)."""
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"expected a GPT-2 config (model_type 'gpt2'), got model_type {hf.get('model_type')!r}")
        unsupported = {
            "scale_attn_by_inverse_layer_idx": True,
            "scale_attn_weights": False,
            "add_cross_attention": True,
            "tie_word_embeddings": False,
        }
        for key, value in unsupported.items():
            if hf.get(key, not value) == value:
                raise ValueError(f"GPT-2 config option {key}={value} is not supported")
        activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
        if hf.get("activation_function", "gelu_new") not in activations:
            raise ValueError(
                f"activation_function {hf['activation_function']!r} is not supported; "
                f"supported: {', '.join(activations)}"
            )
        fields = dict(
            vocab_size=hf.get("vocab_size", 50257),
            n_ctx=hf.get("n_positions", 1024),
            n_embd=hf.get("n_embd", 768),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_inner=hf.get("n_inner"),
            dropout=float(hf.get("resid_pdrop", 0.1)),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation=activations[hf.get("activation_function", "gelu_new")],
        )
        return cls(**{**fields, **overrides})

    def to_hf_config(self) -> dict:
        """The fields of the equivalent Hugging Face ``GPT2Config`` (``GPT2Config(**d)``)."""
        if not self.bias:
            raise ValueError("GPT-2 in Hugging Face always has biases; a bias=False model has no HF equivalent")
        eot = self.vocab_size - 1
        return dict(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            vocab_size=self.vocab_size,
            n_positions=self.n_ctx,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_inner=self.n_inner,
            activation_function="gelu_new" if self.activation == "gelu_tanh" else "gelu",
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            layer_norm_epsilon=self.layer_norm_epsilon,
            bos_token_id=eot,
            eos_token_id=eot,
            tie_word_embeddings=True,
        )


# ---- the KV cache -------------------------------------------------------------------------------


class KVCache:
    """Every layer's keys and values for up to ``capacity`` positions, filled left to right.

    Allocated once, on the first :meth:`append`, as ``keys, values: Tensor[L, B, H, capacity, D]``
    in the dtype of the keys. A forward pass appends its ``T`` new positions in each layer, then
    advances :attr:`length` by ``T``.
    """

    def __init__(self, n_layer: int, capacity: int):
        self.n_layer, self.capacity = n_layer, capacity
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v: Tensor[B, H, T, D]`` after the cached positions of ``layer``; returns that
        layer's keys and values so far, ``Tensor[B, H, length + T, D]`` views of the cache."""
        if self.keys is None:
            shape = (self.n_layer, *k.shape[:2], self.capacity, k.size(3))
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape)
        end = self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions do not fit its capacity of {self.capacity}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# ---- the blocks ---------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``c_attn`` projects to q, k, v (in that order),
    ``c_proj`` back to the residual width."""

    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer_index = config.n_head, config.head_dim, layer_index
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """``x: Tensor[B, T, E]``; ``key_mask: Tensor[B, 1, 1, past + T]`` bool (False = padding);
        ``cache`` holds the ``past`` positions' keys and values. Returns ``Tensor[B, T, E]``."""
        B, T, E = x.shape
        # [B, T, 3, H, D] -> three [B, H, T, D] views (no copy: the kernel takes strided rows)
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
        # causal is aligned to the end: query i (position past + i) sees keys 0 .. past + i
        y = ops.attention(
            q, k, v, causal=True, attn_mask=key_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, E)))


class MLP(nn.Module):
    """``c_fc`` (E -> 4E), GELU, ``c_proj`` (4E -> E)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.act = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """A pre-norm transformer block: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        attn_out = self.attn(self.ln_1(x), key_mask, cache)
        h, x = self.ln_2(attn_out, residual=x)  # x + attn_out and its LayerNorm, in one pass
        return x + self.mlp(h)


# ---- the model ----------------------------------------------------------------------------------


class GPT(nn.Module):
    """GPT-2: token + position embeddings, ``n_layer`` blocks, a final LayerNorm, and ``lm_head``
    tied to the token embedding.

    Initialisation is GPT-2's: linear and embedding weights ~ N(0, 0.02), the two ``c_proj``
    weights that write into the residual stream ~ N(0, 0.02 / sqrt(2 * n_layer)), biases 0,
    LayerNorms 1 and 0. It draws from torch's global generator, so ``torch.manual_seed`` before
    ``GPT(config)`` makes it reproducible.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_ctx, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.transformer.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.transformer.h:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(projection.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied head once); ``non_embedding`` leaves out the embeddings."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return total

    def hidden_states(self, idx: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """The final LayerNorm's output, ``Tensor[B, T, E]``, for token ids ``idx: Tensor[B, T]``.

        ``attention_mask: Tensor[B, past + T]`` (1 = token, 0 = padding) covers the ``past``
        positions held in ``cache`` and these ``T``; padded keys are hidden and position ids count
        only tokens, so a padded row computes what the row alone would.
        """
        _check_token_ids(idx)
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if past + T > self.config.n_ctx:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the model's context n_ctx = {self.config.n_ctx}"
            )
        if attention_mask is None:
            key_mask = None
            positions = torch.arange(past, past + T, device=idx.device).expand(B, T)
        else:
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(
                    f"expected attention_mask of shape [B, past + T] = {[B, past + T]}, "
                    f"got {list(attention_mask.shape)}"
                )
            key_mask = attention_mask.bool()[:, None, None, :]
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x, key_mask, cache)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        return_logits: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Next-token logits and loss for ``idx: Tensor[B, T]``.

        Without ``targets``: ``(logits: Tensor[B, T, vocab_size], None)``.
        With ``targets: Tensor[B, T]`` (the next token at each position; ``-100`` = no loss, and
        positions where ``attention_mask`` is 0 count as ``-100``): ``(None, loss)``, the mean
        cross-entropy computed by :func:`fastdl.ops.linear_cross_entropy` without forming the
        logits (their ``[B, T, vocab_size]`` float32 buffer is 206 MB for one 1024-token GPT-2
        sequence, and as much again for its gradient). ``return_logits=True`` computes them too.
        """
        h = self.hidden_states(idx, attention_mask)
        if targets is None:
            return self.lm_head(h), None
        if targets.shape != idx.shape:
            raise ValueError(f"expected targets of idx's shape {list(idx.shape)}, got {list(targets.shape)}")
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask == 0, -100)
        loss = ops.linear_cross_entropy(
            h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1), ignore_index=-100
        )
        return (self.lm_head(h) if return_logits else None), loss

    # ---- generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: Tensor | None = None,
        stream: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """Continue the prompts ``idx: Tensor[B, T]``; returns ``Tensor[B, T + n]`` (prompts first).

        Args:
            max_new_tokens: at most this many tokens per row (``n``; fewer when every row has
                emitted ``eos_token_id``). ``T + max_new_tokens`` must not exceed ``n_ctx``.
            temperature: divides the logits; ``0`` picks the most likely token (greedy).
            top_k: sample among the ``top_k`` most likely tokens only.
            top_p: sample among the smallest set of tokens whose probability reaches ``top_p``.
            eos_token_id: a row that emits it is finished and emits it from then on.
            generator: the ``torch.Generator`` to sample from (default: torch's global one).
            attention_mask: ``Tensor[B, T]``, 1 = token, 0 = padding. Prompts of different lengths
                are LEFT-padded (padding first), so every row's next token is at the end; each row
                then generates what its prompt alone would.
            stream: called after every step with that step's tokens, ``Tensor[B]``.

        The prompt runs once (prefill), writing every layer's keys and values into a
        :class:`KVCache` allocated for ``T + max_new_tokens`` positions; each later step feeds
        one token per row and attends to the cache. Dropout is off during generation.
        """
        _check_token_ids(idx)
        B, T = idx.shape
        if T == 0:
            raise ValueError("generate needs a prompt of at least one token, got idx of shape [B, 0]")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if T + max_new_tokens > self.config.n_ctx:
            raise ValueError(
                f"prompt of {T} tokens + max_new_tokens={max_new_tokens} = {T + max_new_tokens} exceeds "
                f"the model's context n_ctx = {self.config.n_ctx}"
            )
        if eos_token_id is not None and not 0 <= eos_token_id < self.config.vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {self.config.vocab_size})")
        _check_sampling(temperature, top_k, top_p)
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"expected attention_mask of idx's shape {[B, T]}, got {list(attention_mask.shape)}")
            prompt_mask = attention_mask.bool()
            if (prompt_mask[:, 1:] < prompt_mask[:, :-1]).any() or not prompt_mask[:, -1].all():
                raise ValueError("generate expects LEFT-padded prompts (attention_mask 0s before the 1s of each row)")
            # generated positions are tokens in every row
            mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)
        was_training = self.training
        self.eval()
        try:
            cache = KVCache(self.config.n_layer, T + max_new_tokens)
            finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
            pieces = [idx]
            tokens = idx
            for _ in range(max_new_tokens):
                visible = None if mask is None else mask[:, : cache.length + tokens.size(1)]
                # only the last position's hidden state becomes logits
                logits = self.lm_head(self.hidden_states(tokens, visible, cache)[:, -1])
                next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    next_token = next_token.masked_fill(finished, eos_token_id)
                    finished |= next_token == eos_token_id
                pieces.append(next_token[:, None])
                if stream is not None:
                    stream(next_token)
                if eos_token_id is not None and bool(finished.all()):
                    break
                tokens = next_token[:, None]
        finally:
            self.train(was_training)
        return torch.cat(pieces, dim=1)

    # ---- Hugging Face checkpoints -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> GPT:
        """A model from a local Hugging Face GPT-2 folder: ``config.json`` and
        ``model.safetensors`` (or sharded ``model.safetensors.index.json``, or
        ``pytorch_model.bin``). Nothing is downloaded. ``overrides`` replace config fields, e.g.
        ``dropout=0.0``."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder: no config.json")
        config = GPTConfig.from_hf_config(json.loads(config_file.read_text()), **overrides)
        model = cls(config)
        model.load_hf_state_dict(_read_hf_weights(path), source=str(path))
        return model

    def load_hf_state_dict(self, state_dict: Mapping[str, Tensor], source: str = "state_dict") -> None:
        """Load the weights of a Hugging Face ``GPT2LMHeadModel`` or ``GPT2Model`` (keys with or
        without the ``transformer.`` prefix; Conv1D weights ``in x out``). Every parameter must
        be present with its shape: otherwise a ValueError lists each missing, unexpected and
        mis-shaped key."""
        expected = {name: p.shape for name, p in self.state_dict().items() if name != "lm_head.weight"}
        converted, problems, mis_shaped = {}, [], set()
        for key, tensor in state_dict.items():
            name = key if key.startswith("transformer.") or key == "lm_head.weight" else f"transformer.{key}"
            if name.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):
                continue  # older checkpoints store the causal mask as a buffer
            if name == "lm_head.weight":
                wte = state_dict.get("transformer.wte.weight", state_dict.get("wte.weight"))
                if wte is None or tensor.shape != wte.shape or not torch.equal(tensor, wte):
                    problems.append(
                        "lm_head.weight differs from transformer.wte.weight: only the tied GPT-2 head is supported"
                    )
                continue
            if name not in expected:
                problems.append(f"unexpected key {key}")
                continue
            if _is_conv1d(name):
                if tensor.dim() != 2 or tensor.shape[::-1] != expected[name]:
                    problems.append(
                        f"{key}: checkpoint {list(tensor.shape)} (Conv1D, in x out) vs model "
                        f"{list(expected[name])} (nn.Linear, out x in)"
                    )
                    mis_shaped.add(name)
                    continue
                tensor = tensor.t()
            elif tensor.shape != expected[name]:
                problems.append(f"{key}: checkpoint {list(tensor.shape)} vs model {list(expected[name])}")
                mis_shaped.add(name)
                continue
            converted[name] = tensor
        problems += [
            f"missing key {name} (shape {list(shape)})"
            for name, shape in expected.items()
            if name not in converted and name not in mis_shaped
        ]
        if problems:
            raise ValueError(f"{source} does not fit this GPT-2 configuration:\n  " + "\n  ".join(problems))
        converted["lm_head.weight"] = converted["transformer.wte.weight"]
        self.load_state_dict(converted, strict=True)

    def to_hf_state_dict(self) -> dict[str, Tensor]:
        """The weights under Hugging Face ``GPT2LMHeadModel``'s keys and layouts (Conv1D weights
        transposed to ``in x out``); ``GPT2LMHeadModel.load_state_dict(..., strict=True)`` takes it."""
        return {name: (t.t().contiguous() if _is_conv1d(name) else t).detach() for name, t in self.state_dict().items()}

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` in Hugging Face's GPT-2 format (readable
        by :meth:`from_pretrained` and by ``transformers.GPT2LMHeadModel.from_pretrained``)."""
        save_file = _import_safetensors().save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_hf_config(), indent=2) + "\n")
        weights = {name: t.contiguous() for name, t in self.to_hf_state_dict().items() if name != "lm_head.weight"}
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def _check_token_ids(idx: Tensor) -> None:
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"expected idx to be integer token ids of shape [B, T], got {idx.dtype} of shape {list(idx.shape)}"
        )


_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _is_conv1d(name: str) -> bool:
    return name.startswith("transformer.h.") and name.endswith(_CONV1D_WEIGHTS)


def _import_safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "reading and writing model.safetensors needs the safetensors package: pip install safetensors"
        ) from None
    return safetensors.torch


def _read_hf_weights(path: Path) -> dict[str, Tensor]:
    """The state_dict of a Hugging Face model folder, on the CPU."""
    if (path / "model.safetensors").is_file():
        return _import_safetensors().load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        load_file = _import_safetensors().load_file
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(path / shard)))
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# ---- sampling -----------------------------------------------------------------------------------


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row from ``logits: Tensor[B, V]``: ``Tensor[B]`` int64.

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by ``temperature``,
    cut to the ``top_k`` largest, then to the smallest set whose probability reaches ``top_p``
    (the most likely token always stays), and one token is drawn from ``generator``.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones already reach top_p
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---- sequence classification --------------------------------------------------------------------


class GPTClassifier(nn.Module):
    """A GPT with a classification head on the hidden state of each sequence's last token (the
    only position that has seen the whole sequence), e.g. a spam classifier.

    ``GPTClassifier(GPT.from_pretrained(path), num_labels=2)`` fine-tunes a pretrained model;
    ``GPTClassifier(config, num_labels)`` builds a fresh one. ``score`` is ``nn.Linear(E,
    num_labels)`` ~ N(0, 0.02) with zero bias.
    """

    def __init__(self, gpt: GPT | GPTConfig, num_labels: int):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.gpt = gpt if isinstance(gpt, GPT) else GPT(gpt)
        self.score = nn.Linear(self.gpt.config.n_embd, num_labels)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.score.bias)

    def forward(
        self, idx: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``idx: Tensor[B, T]``, ``labels: Tensor[B]`` int64, ``attention_mask: Tensor[B, T]``
        (1 = token; left or right padding). Returns ``(logits: Tensor[B, num_labels], loss)``,
        the loss the mean cross-entropy (``None`` without labels)."""
        h = self.gpt.hidden_states(idx, attention_mask)
        if attention_mask is None:
            last = h[:, -1]
        else:
            # the rightmost token of each row, wherever the padding is
            last_index = (torch.arange(idx.size(1), device=idx.device) * (attention_mask != 0)).argmax(dim=-1)
            last = h[torch.arange(idx.size(0), device=idx.device), last_index]
        logits = self.score(last)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return logits, loss
