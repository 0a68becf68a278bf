"""Sequence encoders: `forward(x [B, L, D], attention_mask [B, L], position_ids [B, L]) -> [B, L, D]`.

Histories are left-padded, so positions are counted from each user's oldest real item
(`position_ids = cumsum(attention_mask) - 1`): the same history gives the same output however
much padding sits in front of it. Every encoder takes a boolean mask built by `attention_allowed`.

The causal encoders but HSTU also continue one user's history without encoding it again:
`extend(x [1, T, D], state) -> ([1, T, D], state)` computes only the T new positions from the keys and values
of the earlier ones (`EncoderState`), and equals `forward` on the whole history (eval mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, DynamicCache, GPT2Config, LlamaConfig, PretrainedConfig, Qwen2Config
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from rec_train.model.configuration import RecConfig


def attention_allowed(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """bool [B, 1, L, L], True where query i may attend to key j.

    Real keys only (and, when causal, no later key). A padded query attends to itself so no row is
    empty (an all-masked row would make SDPA return NaN); padded outputs are never read.
    """
    length = attention_mask.shape[-1]
    device = attention_mask.device
    allowed = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return allowed | torch.eye(length, dtype=torch.bool, device=device)  # [B, 1, L, L]


@dataclass
class EncoderState:
    """One user's encoded positions so far: `length` of them, and every block's keys and values (`cache`: a
    transformers `DynamicCache`, or a list of (keys, values) [1, H, length, hd] per SASRec block)."""

    length: int
    cache: Any

    def nbytes(self) -> int:
        if isinstance(self.cache, list):
            return sum(k.nbytes + v.nbytes for k, v in self.cache)
        return sum(
            t.nbytes for layer in self.cache.layers for t in (layer.keys, layer.values) if t is not None
        )


def extension_mask(new: int, total: int, device: torch.device) -> torch.Tensor | None:
    """bool [1, 1, new, total]: new query i (position total - new + i) sees every key up to its own; None for
    one new position, which sees every key."""
    if new == 1:
        return None
    keys = torch.arange(total, device=device)
    queries = torch.arange(total - new, total, device=device)
    return (keys[None, :] <= queries[:, None])[None, None]


def _positions(state: EncoderState | None, new: int, device: torch.device) -> tuple[int, torch.Tensor]:
    past = state.length if state is not None else 0
    return past, torch.arange(past, past + new, device=device)[None]  # [1, T]


def decoder_config(config: RecConfig, config_class: type[PretrainedConfig]) -> PretrainedConfig:
    """The `LlamaConfig` or `Qwen2Config` the decoder layers are built from (not saved: derived from
    `RecConfig`)."""
    return config_class(
        vocab_size=1,
        hidden_size=config.backbone_width,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads or config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_seq_len + 1,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_dropout=config.attention_dropout,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",
    )


def bert_config(config: RecConfig) -> BertConfig:
    return BertConfig(
        vocab_size=1,
        hidden_size=config.backbone_width,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_seq_len + 1,
        layer_norm_eps=config.norm_eps,
        attn_implementation="sdpa",
    )


def gpt2_config(config: RecConfig) -> GPT2Config:
    return GPT2Config(
        vocab_size=1,
        n_embd=config.backbone_width,
        n_inner=config.intermediate_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        activation_function=config.hidden_act,
        resid_pdrop=config.hidden_dropout,
        embd_pdrop=config.hidden_dropout,
        attn_pdrop=config.attention_dropout,
        n_positions=config.max_seq_len + 1,
        layer_norm_epsilon=config.norm_eps,
        attn_implementation="sdpa",
    )


class LlamaEncoder(nn.Module):
    """Causal decoder: Llama blocks (RMSNorm, rotary positions, gated SiLU MLP) from `transformers`.

    Each block's attention and MLP outputs are dropped with `hidden_dropout` before the residual sum
    (`LlamaDecoderLayer` has no dropout of its own, so its parts are called here).
    """

    causal = True
    config_class: type[PretrainedConfig] = LlamaConfig
    layer_class: type[nn.Module] = LlamaDecoderLayer
    norm_class: type[nn.Module] = LlamaRMSNorm
    rotary_class: type[nn.Module] = LlamaRotaryEmbedding

    def __init__(self, config: RecConfig) -> None:
        super().__init__()
        dc = decoder_config(config, self.config_class)
        self.layers = nn.ModuleList([self.layer_class(dc, i) for i in range(config.num_hidden_layers)])
        self.norm = self.norm_class(dc.hidden_size, eps=dc.rms_norm_eps)
        self.rotary_emb = self.rotary_class(dc)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        allowed = attention_allowed(attention_mask, causal=True)
        rotary = self.rotary_emb(x, position_ids)  # (cos, sin) each [B, L, head_dim]
        for layer in self.layers:  # x [B, L, D]
            attended, _ = layer.self_attn(
                layer.input_layernorm(x), attention_mask=allowed, position_embeddings=rotary
            )
            x = x + self.dropout(attended)
            x = x + self.dropout(layer.mlp(layer.post_attention_layernorm(x)))
        return self.norm(x)

    def extend(self, x: torch.Tensor, state: EncoderState | None) -> tuple[torch.Tensor, EncoderState]:
        if x.shape[1] == 1:
            return self._extend_one(x, state)
        past, positions = _positions(state, x.shape[1], x.device)
        cache = state.cache if state is not None else DynamicCache()
        allowed = extension_mask(x.shape[1], past + x.shape[1], x.device)
        rotary = self.rotary_emb(x, positions)
        for layer in self.layers:  # x [1, T, D]
            attended, _ = layer.self_attn(
                layer.input_layernorm(x), attention_mask=allowed, position_embeddings=rotary, cache=cache
            )
            x = x + attended
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x), EncoderState(past + x.shape[1], cache)

    def _extend_one(self, x: torch.Tensor, state: EncoderState | None) -> tuple[torch.Tensor, EncoderState]:
        """`extend` by one position (a cached user's new event): each block's projections called directly,
        the arithmetic of its own forward without the per-call overhead that dominates at one position."""
        past, positions = _positions(state, 1, x.device)
        cache = state.cache if state is not None else DynamicCache()
        cos, sin = self.rotary_emb(x, positions)  # each [1, 1, head_dim]
        for index, layer in enumerate(self.layers):  # x [1, 1, D]
            attention, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            q, k, v = (
                F.linear(h, p.weight, p.bias).view(1, 1, -1, attention.head_dim).transpose(1, 2)
                for p in (attention.q_proj, attention.k_proj, attention.v_proj)
            )  # each [1, heads, 1, head_dim]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = cache.update(k, v, index)  # each [1, kv_heads, past + 1, head_dim]
            attended = F.scaled_dot_product_attention(
                q, keys, values, scale=attention.scaling, enable_gqa=True
            )
            o = attention.o_proj
            x = x + F.linear(attended.transpose(1, 2).reshape(1, 1, -1), o.weight, o.bias)
            h = layer.post_attention_layernorm(x)
            gate = F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)
            up = F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias)
            x = x + F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        return self.norm(x), EncoderState(past + 1, cache)


class Qwen2Encoder(LlamaEncoder):
    """Causal decoder: Qwen2 blocks (Llama's, with biases on the query, key and value projections)."""

    config_class = Qwen2Config
    layer_class = Qwen2DecoderLayer
    norm_class = Qwen2RMSNorm
    rotary_class = Qwen2RotaryEmbedding


class GPT2Encoder(nn.Module):
    """Causal decoder: GPT-2 blocks (pre-LN, GELU MLP) from `transformers`, learned absolute positions,
    a final LayerNorm."""

    causal = True

    def __init__(self, config: RecConfig) -> None:
        super().__init__()
        gc = gpt2_config(config)
        self.position_embeddings = nn.Embedding(config.max_seq_len + 1, gc.n_embd)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([GPT2Block(gc, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(gc.n_embd, eps=gc.layer_norm_epsilon)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        allowed = attention_allowed(attention_mask, causal=True)
        x = self.dropout(x + self.position_embeddings(position_ids))
        for layer in self.layers:  # x [B, L, D]
            x = layer(x, attention_mask=allowed)
        return self.norm(x)

    def extend(self, x: torch.Tensor, state: EncoderState | None) -> tuple[torch.Tensor, EncoderState]:
        past, positions = _positions(state, x.shape[1], x.device)
        cache = state.cache if state is not None else DynamicCache()
        allowed = extension_mask(x.shape[1], past + x.shape[1], x.device)
        x = x + self.position_embeddings(positions)
        for layer in self.layers:  # x [1, T, D]
            x = layer(x, cache=cache, attention_mask=allowed)
        return self.norm(x), EncoderState(past + x.shape[1], cache)


class BertEncoder(nn.Module):
    """Bidirectional encoder: BERT blocks (post-LN) from `transformers`, learned absolute positions."""

    causal = False

    def __init__(self, config: RecConfig) -> None:
        super().__init__()
        bc = bert_config(config)
        self.position_embeddings = nn.Embedding(config.max_seq_len + 1, bc.hidden_size)
        self.norm = nn.LayerNorm(bc.hidden_size, eps=bc.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([BertLayer(bc, layer_idx=i) for i in range(config.num_hidden_layers)])

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        allowed = attention_allowed(attention_mask, causal=False)
        x = self.dropout(self.norm(x + self.position_embeddings(position_ids)))
        for layer in self.layers:
            x = layer(x, attention_mask=allowed)
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.attend(x, allowed, None)[0]

    def attend(
        self, x: torch.Tensor, allowed: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, L, D] after the `past` keys and values ([B, H, P, hd] each) -> (out [B, L, D], all keys and
        values [B, H, P + L, hd])."""
        b, length, width = x.shape
        shape = (b, length, self.heads, width // self.heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, H, P + L, hd]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, length, width)), (k, v)  # [B, L, D]


class SASRecBlock(nn.Module):
    """Pre-LN block: x + drop(attn(LN x)), then x + drop(MLP(LN x))."""

    def __init__(self, config: RecConfig) -> None:
        super().__init__()
        width = config.backbone_width
        self.attn_norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.attn = SelfAttention(width, config.num_attention_heads, config.attention_dropout)
        self.mlp_norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.up_proj = nn.Linear(width, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.down_proj = nn.Linear(config.intermediate_size, width)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.extend(x, allowed, None)[0]

    def extend(
        self, x: torch.Tensor, allowed: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attended, kv = self.attn.attend(self.attn_norm(x), allowed, past)
        x = x + self.dropout(attended)
        return x + self.dropout(self.down_proj(self.dropout(self.act(self.up_proj(self.mlp_norm(x)))))), kv


class SASRecEncoder(nn.Module):
    """SASRec-style causal encoder: learned absolute positions, pre-LN blocks, final LayerNorm."""

    causal = True

    def __init__(self, config: RecConfig) -> None:
        super().__init__()
        width = config.backbone_width
        self.position_embeddings = nn.Embedding(config.max_seq_len + 1, width)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([SASRecBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        allowed = attention_allowed(attention_mask, causal=True)
        x = self.dropout(x + self.position_embeddings(position_ids))
        for layer in self.layers:
            x = layer(x, allowed)
        return self.norm(x)

    def extend(self, x: torch.Tensor, state: EncoderState | None) -> tuple[torch.Tensor, EncoderState]:
        past, positions = _positions(state, x.shape[1], x.device)
        allowed = extension_mask(x.shape[1], past + x.shape[1], x.device)
        x = x + self.position_embeddings(positions)
        cache = []
        for i, layer in enumerate(self.layers):  # x [1, T, D]
            x, kv = layer.extend(x, allowed, state.cache[i] if state is not None else None)
            cache.append(kv)
        return self.norm(x), EncoderState(past + x.shape[1], cache)


def relative_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """Bucket of the distance query - key (>= 0) between the L positions of a left-padded batch: exact
    below num_buckets/2, log-spaced above. [L, L], shared by every row: for two real items the index
    difference equals the difference of their positions, and padding keys are masked anyway."""
    index = torch.arange(length, device=device)
    distance = (index[:, None] - index[None, :]).clamp(min=0)  # [L, L]
    exact = max(1, num_buckets // 2)
    span = math.log(max(max_distance / exact, 2.0))
    log_bucket = (
        exact + (torch.log(distance.clamp(min=exact).float() / exact) / span * (num_buckets - exact)).long()
    )
    return torch.where(distance < exact, distance, log_bucket.clamp(max=num_buckets - 1))


class HSTUBlock(nn.Module):
    """HSTU layer: U, V, Q, K = split(SiLU(W x)); A = SiLU(QK^T + rel_bias) / n; out = W_o(LN(A V) * U)."""

    def __init__(self, config: RecConfig) -> None:
        super().__init__()
        width = config.backbone_width
        self.heads = config.num_attention_heads
        self.scale_len = config.max_seq_len  # HSTU normalises by a constant length, not a softmax
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.uvqk_proj = nn.Linear(width, 4 * width)
        self.relative_bias = nn.Embedding(config.hstu_num_buckets, self.heads)
        self.attn_norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.o_proj = nn.Linear(width, width)
        self.attn_dropout = nn.Dropout(config.attention_dropout)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        u, v, q, k = F.silu(self.uvqk_proj(self.norm(x))).chunk(4, dim=-1)  # each [B, L, D]
        shape = (b, length, self.heads, width // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # [B, H, L, hd]
        bias = self.relative_bias(buckets).permute(2, 0, 1)  # [L, L, H] -> [H, L, L], same for every row
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads) + bias  # [B, H, L, L]
        weights = F.silu(scores) * allowed / self.scale_len
        out = (self.attn_dropout(weights) @ v).transpose(1, 2).reshape(b, length, width)  # [B, L, D]
        return x + self.dropout(self.o_proj(self.attn_norm(out) * u))


class HSTUEncoder(nn.Module):
    """Causal HSTU stack (pointwise SiLU attention with a relative position bias) and a final LayerNorm."""

    causal = True

    def __init__(self, config: RecConfig) -> None:
        super().__init__()
        self.num_buckets = config.hstu_num_buckets
        self.max_distance = config.max_seq_len
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([HSTUBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.backbone_width, eps=config.norm_eps)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        allowed = attention_allowed(attention_mask, causal=True)
        buckets = relative_buckets(x.shape[1], self.num_buckets, self.max_distance, x.device)  # [L, L]
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, allowed, buckets)
        return self.norm(x)


ENCODER_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaEncoder,
    "qwen2": Qwen2Encoder,
    "gpt2": GPT2Encoder,
    "bert": BertEncoder,
    "sasrec": SASRecEncoder,
    "hstu": HSTUEncoder,
}


def build_encoder(config: RecConfig) -> nn.Module:
    return ENCODER_CLASSES[config.encoder](config)
