"""`RecModel`: item vectors -> transformer over the history -> user vector; score = user . item.

Histories are left-padded with 0, most recent item last. `labels[b, t]` is the item that follows
position t (0 = no loss there). Training, evaluation and serving share `encode_users`,
`item_embeddings` and `score`; serving imports this module, so it must never import Ray or DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from rec_train.model.configuration import CAUSAL_ENCODERS, POINTWISE_HEADS, ROTARY_ENCODERS, RecConfig
from rec_train.model.encoders import EncoderState, build_encoder
from rec_train.model.item_tower import ItemTower
from rec_train.ranking import candidate_scores


@dataclass
class RecOutput(ModelOutput):
    """`loss` (when labels or targets are given), `hidden_states` [B, L, d], `pointwise_logits` [B] (or
    [M], one per non-zero candidate, for candidates [B, L])."""

    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    pointwise_logits: torch.Tensor | None = None


class ItemEncoder(nn.Module):
    """Item index -> d-vector from an ID table and/or a projection of item text vectors: fixed ones
    (`text_embeddings`, from `rec-train embed-items`) or those of a trainable LM item tower (`tower`)."""

    def __init__(self, config: RecConfig) -> None:
        super().__init__()
        self.fusion = config.fusion
        rows, width = config.num_items + 1, config.hidden_size
        self.id_embeddings = nn.Embedding(rows, width, padding_idx=0) if config.uses_ids else None
        self.text_proj = nn.Linear(config.text_dim, width) if config.uses_text else None
        self.fuse = (
            nn.Linear(2 * width, width)
            if config.uses_ids and config.uses_text and config.fusion != "sum"
            else None
        )
        self.tower = ItemTower(config) if config.item_tower is not None else None
        if config.uses_text and self.tower is None:
            # [num_items + 1, text_dim], row 0 zeros: data, not trained, saved with the model.
            self.register_buffer("text_embeddings", torch.zeros(rows, config.text_dim))
        else:
            self.text_embeddings = None

    @property
    def rows(self) -> int:
        """num_items + 1"""
        if self.id_embeddings is not None:
            return self.id_embeddings.num_embeddings
        return (self.tower.token_counts if self.tower is not None else self.text_embeddings).shape[0]

    def text_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> the items' text vectors [..., text_dim] (before the projection)."""
        return self.tower(ids) if self.tower is not None else self.text_embeddings[ids]

    def text_table(self) -> torch.Tensor:
        """[num_items + 1, text_dim]: every item's text vector (the tower's in batches)."""
        return self.tower.table() if self.tower is not None else self.text_embeddings

    def combine(self, id_vec: torch.Tensor | None, text_vec: torch.Tensor | None) -> torch.Tensor:
        if text_vec is None:
            return id_vec
        if id_vec is None:
            return text_vec
        if self.fusion == "sum":
            return id_vec + text_vec
        both = torch.cat([id_vec, text_vec], dim=-1)  # [..., 2d]
        if self.fusion == "concat":
            return self.fuse(both)
        gate = torch.sigmoid(self.fuse(both))  # [..., d], 1 = trust the ID row
        return gate * id_vec + (1.0 - gate) * text_vec

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., d]"""
        id_vec = self.id_embeddings(ids) if self.id_embeddings is not None else None
        text_vec = self.text_proj(self.text_vectors(ids)) if self.text_proj is not None else None
        return self.combine(id_vec, text_vec)

    def table(self) -> torch.Tensor:
        """All items, [num_items + 1, d] (row 0 is padding). Goes through the submodules' forward; the
        tower's text vectors come from its batched table, never from one forward pass over every item."""
        device = (
            self.text_proj.weight.device if self.text_proj is not None else self.id_embeddings.weight.device
        )
        ids = torch.arange(self.rows, device=device)
        if self.tower is None:
            return self(ids)
        id_vec = self.id_embeddings(ids) if self.id_embeddings is not None else None
        return self.combine(id_vec, self.text_proj(self.tower.table()))


class PointwiseHead(nn.Module):
    """(user, candidate) -> one logit: an MLP over [u, e, u * e]."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(3 * width, width)
        self.act = nn.SiLU()
        self.out_proj = nn.Linear(width, 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        features = torch.cat([users, items, users * items], dim=-1)  # [B, 3d]
        return self.out_proj(self.act(self.dense(features))).squeeze(-1)  # [B]


class RecPreTrainedModel(PreTrainedModel):
    config_class = RecConfig
    base_model_prefix = "rec"
    main_input_name = "input_ids"
    _supports_sdpa = True


class RecModel(RecPreTrainedModel):
    """Sequential recommender (see `RecConfig`); `forward` computes losses, the rest scores users."""

    def __init__(self, config: RecConfig) -> None:
        super().__init__(config)
        width, backbone = config.hidden_size, config.backbone_width
        self.items = ItemEncoder(config)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.in_proj = nn.Linear(width, backbone) if backbone != width else None
        self.encoder = build_encoder(config)
        self.out_proj = nn.Linear(backbone, width) if backbone != width else None
        # The [mask] vector of the masked-item objective; a module (not a bare Parameter) so that
        # ZeRO-3 gathers it whenever it is used, inside forward or not.
        self.mask_embedding = nn.Embedding(1, width) if config.objective == "masked_item" else None
        self.pointwise = PointwiseHead(width) if config.pointwise_head else None
        # Events per item (popularity negatives, logQ correction); set with `set_item_counts`.
        self.register_buffer("item_counts", torch.zeros(config.num_items + 1))
        self.post_init()

    # ---- encoding -------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module | None:
        return self.items.id_embeddings

    def _encode(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Item vectors x [B, L, d] + mask [B, L] -> hidden states [B, L, d]."""
        limit = self.config.max_seq_len + (0 if self.config.is_causal else 1)
        if x.shape[1] > limit and self.config.encoder not in ROTARY_ENCODERS:
            raise ValueError(
                f"sequence length {x.shape[1]} exceeds model.max_seq_len={self.config.max_seq_len}; "
                "keep the most recent items (rec_train.data.collate.pad_left)"
            )
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L], 0 = oldest real item
        if self.config.scale_embedding:  # item vectors x sqrt(d), as SASRec does before adding positions
            x = x * math.sqrt(x.shape[-1])
        x = self.embedding_dropout(x)
        if self.in_proj is not None:
            x = self.in_proj(x)  # [B, L, D]
        h = self.encoder(x, attention_mask, position_ids)
        return self.out_proj(h) if self.out_proj is not None else h  # [B, L, d]

    def _user_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, d] before any normalisation: the state after the most recent item (causal encoders) or
        at a mask position appended after it (bidirectional encoder)."""
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        limit = self.config.max_seq_len
        input_ids, attention_mask = input_ids[:, -limit:], attention_mask[:, -limit:]
        x = self.items(input_ids)  # [B, L, d]
        if self.mask_embedding is not None:
            b = x.shape[0]
            mask_vec = self.mask_embedding(input_ids.new_zeros(b, 1))  # [B, 1, d]
            x = torch.cat([x, mask_vec], dim=1)  # [B, L + 1, d]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
        return self._encode(x, attention_mask)[:, -1]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.config.l2_normalize else x

    def encode_users(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Left-padded histories [B, L] -> user vectors [B, d] (L2-normalised when the config says so)."""
        return self._normalise(self._user_vectors(input_ids, attention_mask))

    @property
    def keeps_user_state(self) -> bool:
        """True when one user's history can be continued from its `EncoderState` (`extend_user`): a causal
        encoder with an `extend` (not HSTU), not read at a mask position."""
        return self.mask_embedding is None and hasattr(self.encoder, "extend")

    @torch.no_grad()
    def extend_user(
        self, new_ids: torch.Tensor, state: EncoderState | None = None
    ) -> tuple[torch.Tensor, EncoderState]:
        """One user's history continued by the items `new_ids` [T] (oldest first) from `state` (None: from
        the start) -> (user vector [d], the state after them); equals `encode_users` on the whole history
        while it is at most `max_seq_len` items (eval mode)."""
        if not self.keeps_user_state or self.training:
            raise ValueError(
                f"extend_user needs eval mode and a causal encoder with state, not {self.config.encoder!r}"
            )
        x = self.items(new_ids[None])  # [1, T, d]
        if self.config.scale_embedding:
            x = x * math.sqrt(x.shape[-1])
        if self.in_proj is not None:
            x = self.in_proj(x)  # [1, T, D]
        h, state = self.encoder.extend(x, state)
        h = self.out_proj(h) if self.out_proj is not None else h  # [1, T, d]
        return self._normalise(h[0, -1]), state

    def item_embeddings(self) -> torch.Tensor:
        """[num_items + 1, d] in the same space as `encode_users`; row 0 is padding, never recommended."""
        return self._normalise(self.items.table())

    # ---- losses ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        **kwargs,
    ) -> RecOutput:
        """Next-item (or masked-item) training with `labels` [B, L]; the pointwise head with
        `candidates` [B] and `targets` [B] (ratings for "rating", 0/1 for "click"), or, for causal encoders,
        `candidates` [B, L] and `targets` [B, L] with `candidates[b, t]` the item rated after position t
        (0 = none), as `labels` in next-item training.

        For `objective="masked_item"`, `labels` is the sequence that gets masked: the history shifted by
        one, so it ends with the newest item. In training a `mask_prob` share of its items and always
        the newest are replaced by the mask vector; in eval mode only the newest.
        """
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        if candidates is not None:
            return self._pointwise_forward(input_ids, attention_mask, candidates, targets)
        if labels is not None and self.config.objective == "masked_item":
            return self._masked_item_forward(labels)
        hidden = self._encode(self.items(input_ids), attention_mask)  # [B, L, d]
        loss = None
        if labels is not None:
            at = labels != 0  # [B, L]
            seen = self._seen_items(input_ids, at) if self.config.exclude_history else None
            loss = self._item_loss(hidden[at], labels[at], seen)
        return RecOutput(loss=loss, hidden_states=hidden)

    def _seen_items(self, input_ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """[M, N + 1] bool: for each labelled position (b, t) of `at` [B, L], the items of `input_ids[b, :t + 1]`."""
        rows, length = input_ids.shape
        positions = torch.arange(length, dtype=torch.int32, device=input_ids.device)  # [L]
        first = torch.full(
            (rows, self.config.num_items + 1), length, dtype=torch.int32, device=input_ids.device
        )
        first.scatter_reduce_(1, input_ids, positions.expand(rows, length), reduce="amin")  # [B, N + 1]
        b, t = at.nonzero(as_tuple=True)  # [M] each, in the order of `hidden[at]`
        return first[b] <= t[:, None]  # [M, N + 1]

    def _masked_item_forward(self, sequence: torch.Tensor) -> RecOutput:
        real = sequence != 0  # [B, L]
        chosen = torch.zeros_like(real)
        if self.training and self.config.mask_prob > 0:
            chosen = (torch.rand(sequence.shape, device=sequence.device) < self.config.mask_prob) & real
        chosen[:, -1] = real[:, -1]  # always predict the newest item, as at inference
        x = self.items(sequence)  # [B, L, d]
        x = torch.where(chosen[..., None], self.mask_embedding(torch.zeros_like(sequence)), x)
        hidden = self._encode(x, real.long())
        return RecOutput(loss=self._item_loss(hidden[chosen], sequence[chosen]), hidden_states=hidden)

    def _pointwise_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        candidates: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> RecOutput:
        if self.pointwise is None:
            raise ValueError(
                "this model has no pointwise head: set model.pointwise_head to 'rating' or 'click'"
            )
        hidden = None
        if candidates.dim() == 1:
            users = self._user_vectors(input_ids, attention_mask)  # [B, d]
        else:  # every position at once: the state after position t rates the candidate at t
            if not self.config.is_causal:
                raise ValueError(f"candidates [B, L] need a causal encoder ({', '.join(CAUSAL_ENCODERS)})")
            hidden = self._encode(self.items(input_ids), attention_mask)  # [B, L, d]
            at = candidates != 0  # [B, L]
            users, candidates = hidden[at], candidates[at]  # [M, d], [M]
            targets = targets[at] if targets is not None else None
        logits = self.pointwise(users, self.items(candidates))  # [B] or [M]
        loss = None
        if targets is not None and targets.numel() == 0:
            loss = logits.sum() * 0.0  # no candidate in this batch
        elif targets is not None:
            if self.config.pointwise_head == "rating":
                loss = F.mse_loss(logits, targets.to(logits.dtype))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
        return RecOutput(loss=loss, hidden_states=hidden, pointwise_logits=logits)

    def _item_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Softmax over items for hidden [M, d] with target items [M] (only positions that have one);
        the items of `seen` [M, N + 1] other than the target are left out of the full softmax."""
        if targets.numel() == 0:
            return hidden.sum() * 0.0
        cfg = self.config
        hidden = self._normalise(hidden)
        if cfg.temperature != 1.0:
            hidden = hidden / cfg.temperature  # cheaper than dividing the [M, items] logits
        if cfg.loss == "full_softmax":
            logits = hidden @ self.item_embeddings().T  # [M, N + 1]
            logits[:, 0] = float("-inf")  # padding is never a target
            if seen is not None:  # a repeated item stays a target where it is one
                logits = logits.masked_fill(seen.scatter(1, targets[:, None], False), float("-inf"))
            return F.cross_entropy(logits, targets)
        shared = cfg.negatives_per == "batch"
        negatives = self._sample_negatives(
            targets, (cfg.num_negatives,) if shared else (len(targets), cfg.num_negatives)
        )
        if shared:  # [K]
            pos = self._normalise(self.items(targets))  # [M, d]
            neg_logits = hidden @ self._normalise(self.items(negatives)).T  # [M, K]
        else:  # [M, K]: the item table once (cheaper than M x K text projections), then a gather
            table = self.item_embeddings()  # [N + 1, d]
            pos = table[targets]  # [M, d]
            if cfg.num_negatives * table.shape[1] > table.shape[0]:  # [M, N + 1] is smaller than [M, K, d]
                neg_logits = torch.gather(hidden @ table.T, 1, negatives)  # [M, K]
            else:
                neg_logits = torch.bmm(table[negatives], hidden[:, :, None]).squeeze(-1)  # [M, K]
        logits = torch.cat([(hidden * pos).sum(-1, keepdim=True), neg_logits], dim=1)  # [M, 1 + K]
        if cfg.logq_correction and cfg.negative_sampler != "uniform":
            log_q = self._log_sampling_prob(targets)
            logits = logits - torch.cat(
                [log_q[targets][:, None], log_q[negatives].expand(len(targets), -1)], 1
            )
        hits = torch.cat(
            [torch.zeros_like(targets[:, None], dtype=torch.bool), negatives == targets[:, None]], 1
        )
        logits = logits.masked_fill(hits, float("-inf"))  # [M, 1 + K]; a sampled positive is not a negative
        return F.cross_entropy(logits, torch.zeros_like(targets))

    def _sample_negatives(self, targets: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Item indices of `shape`: [K] shared by the batch, or [M, K] for each of the M positions."""
        device = targets.device
        sampler = self.config.negative_sampler
        if sampler == "in_batch":
            return targets[torch.randint(len(targets), shape, device=device)]
        if sampler == "uniform":
            return torch.randint(1, self.config.num_items + 1, shape, device=device)
        counts = self.item_counts[1:].float()
        if counts.sum() <= 0:
            raise ValueError(
                "negative_sampler='popularity' needs item counts: call model.set_item_counts(counts) "
                "with the `count` column of items.parquet"
            )
        return (torch.multinomial(counts, math.prod(shape), replacement=True) + 1).view(shape)

    def _log_sampling_prob(self, targets: torch.Tensor) -> torch.Tensor:
        """log q(item) [N + 1] for the logQ correction: popularity from `item_counts`, else from the batch."""
        counts = self.item_counts.float()
        if counts.sum() <= 0:
            counts = torch.bincount(targets, minlength=self.config.num_items + 1).float()
        counts = counts.clamp(min=1.0)
        return counts.log() - counts.sum().log()

    # ---- scoring --------------------------------------------------------------------------------

    @torch.no_grad()
    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        k: int = 10,
        exclude_history: bool = True,
        exclude: torch.Tensor | list[list[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items per user: (ids [B, k], scores [B, k]), best first.

        Padding (0) is never returned; `exclude_history` drops items in `input_ids`; `exclude` adds
        per-user ids to drop (a [B, E] tensor padded with 0, or a list of lists). Call `model.eval()` first.
        """
        scores = self.encode_users(input_ids, attention_mask) @ self.item_embeddings().T  # [B, N + 1]
        if exclude is not None and not torch.is_tensor(exclude):
            width = max((len(row) for row in exclude), default=0)
            exclude = torch.tensor(
                [list(row) + [0] * (width - len(row)) for row in exclude], dtype=torch.long
            )
        dropped = [
            t.to(scores.device).long()
            for t in (input_ids if exclude_history else None, exclude)
            if t is not None
        ]
        masked = candidate_scores(scores, torch.cat(dropped, dim=1) if dropped else None)  # [B, N + 1]
        top = masked.topk(min(k, self.config.num_items), dim=-1)
        return top.indices, top.values

    @torch.no_grad()
    def explain(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        item_ids: torch.Tensor | None = None,
        n: int = 3,
    ) -> torch.Tensor:
        """For each recommended item [B, k], the n history items most similar to it (cosine of item
        vectors), most similar first: [B, k, n]; 0 where the history has fewer distinct items."""
        if item_ids is None:
            raise ValueError("explain needs item_ids [B, k]: the recommended items to explain")
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        history = F.normalize(self.items(input_ids), dim=-1)  # [B, L, d]
        recommended = F.normalize(self.items(item_ids), dim=-1)  # [B, k, d]
        similarity = recommended @ history.transpose(1, 2)  # [B, k, L]
        length = input_ids.shape[1]
        later = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).triu(1)  # [L, L] j > i
        same = input_ids[:, :, None] == input_ids[:, None, :]  # [B, L, L]
        repeated = (same & later).any(-1)  # [B, L]: the item appears again later in the history
        usable = attention_mask.bool() & ~repeated & (input_ids != 0)
        similarity = similarity.masked_fill(~usable[:, None, :], float("-inf"))
        best = similarity.topk(min(n, length), dim=-1)
        names = torch.gather(input_ids[:, None, :].expand(-1, item_ids.shape[1], -1), 2, best.indices)
        names = names.masked_fill(torch.isinf(best.values), 0)  # [B, k, min(n, L)]
        return F.pad(names, (0, n - names.shape[-1]))

    # ---- item table maintenance -----------------------------------------------------------------

    @torch.no_grad()
    def set_item_text_embeddings(self, embeddings: torch.Tensor) -> None:
        """Copy a [num_items + 1, text_dim] table (e.g. `read_item_text_embeddings`) into the model."""
        expected = (self.config.num_items + 1, self.config.text_dim)
        if not self.config.uses_text:
            raise ValueError(
                f"model.item_representation={self.config.item_representation!r} uses no text; "
                "set it to 'text' or 'id+text'"
            )
        if self.items.tower is not None:
            raise ValueError("this model computes item text vectors with its item tower: use set_item_tokens")
        if tuple(embeddings.shape) != expected:
            raise ValueError(
                f"item text embeddings have shape {tuple(embeddings.shape)}, the model needs {expected} "
                "(num_items + 1, text_dim): embed the same prepared dataset the model was built for"
            )
        self.items.text_embeddings.copy_(embeddings)

    @torch.no_grad()
    def set_item_tokens(self, token_ids: torch.Tensor, token_counts: torch.Tensor) -> None:
        """The item tower's input: `tokenize_items` of the items' texts, [num_items + 1, T] and [num_items + 1]."""
        if self.items.tower is None:
            raise ValueError("this model has no item tower (model.item_tower); it reads no item tokens")
        if token_ids.shape[0] != self.config.num_items + 1:
            raise ValueError(
                f"item tokens have {token_ids.shape[0]} rows, the model needs num_items + 1 = "
                f"{self.config.num_items + 1}: tokenize the same prepared dataset the model was built for"
            )
        self.items.tower.set_tokens(token_ids, token_counts)

    @torch.no_grad()
    def add_pointwise_head(self, kind: str, bias: float = 0.0) -> None:
        """Put a fresh pointwise head on the model ("rating": MSE, "click": BCE on logits), its output
        starting at `bias` (the mean rating, or the log-odds of a click), e.g. before fine-tuning."""
        if kind not in POINTWISE_HEADS:
            raise ValueError(f"pointwise head {kind!r} is not one of {', '.join(POINTWISE_HEADS)}")
        self.config.pointwise_head = kind
        head = PointwiseHead(self.config.hidden_size).to(self.item_counts.device)
        head.apply(self._init_weights)
        head.out_proj.bias.fill_(bias)
        self.pointwise = head

    @torch.no_grad()
    def set_item_counts(self, counts: torch.Tensor) -> None:
        """Events per item index, [num_items + 1] (index 0 ignored)."""
        if counts.shape != self.item_counts.shape:
            raise ValueError(
                f"item counts have shape {tuple(counts.shape)}, expected {tuple(self.item_counts.shape)}"
            )
        self.item_counts.copy_(counts)

    @torch.no_grad()
    def resize_items(
        self,
        new_num_items: int,
        text_embeddings: torch.Tensor | None = None,
        item_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> RecModel:
        """Grow the item vocabulary to `new_num_items`, keeping every existing row exactly.

        New items' text comes from `text_embeddings` ([new_num_items + 1, text_dim]) or, for a model with
        an item tower, from `item_tokens` (`tokenize_items` of every item, [new_num_items + 1, T] and
        [new_num_items + 1]); their ID rows start at zero with sum fusion (so a new item is its text
        projection), at the text projection with concat / gate fusion, and at random without text.
        """
        old = self.config.num_items
        if new_num_items < old:
            raise ValueError(f"resize_items can only grow the vocabulary: {old} -> {new_num_items}")
        items = self.items
        if items.tower is not None:
            if item_tokens is None and new_num_items != old:
                raise ValueError(
                    "resize_items needs item_tokens (tokenize_items) for a model with an item tower"
                )
            if item_tokens is not None:
                ids, counts = item_tokens
                if ids.shape[0] != new_num_items + 1 or counts.shape[0] != new_num_items + 1:
                    raise ValueError(
                        f"item_tokens have {ids.shape[0]} and {counts.shape[0]} rows, expected {new_num_items + 1}"
                    )
                ids, counts = ids.clone(), counts.clone()
                ids[: old + 1], counts[: old + 1] = items.tower.token_ids, items.tower.token_counts
                items.tower.set_tokens(ids, counts)
        elif self.config.uses_text:
            expected = (new_num_items + 1, self.config.text_dim)
            if text_embeddings is None and new_num_items != old:
                raise ValueError(f"resize_items needs text_embeddings of shape {expected} for a text model")
            if text_embeddings is not None:
                if tuple(text_embeddings.shape) != expected:
                    raise ValueError(
                        f"text_embeddings have shape {tuple(text_embeddings.shape)}, expected {expected}"
                    )
                table = text_embeddings.to(items.text_embeddings).clone()
                table[: old + 1] = items.text_embeddings
                items.text_embeddings = table
        if items.id_embeddings is not None:
            weight = items.id_embeddings.weight
            grown = nn.Embedding(new_num_items + 1, weight.shape[1], padding_idx=0).to(weight)
            grown.weight[: old + 1] = weight
            if new_num_items > old:
                new_rows = grown.weight[old + 1 :]
                if not self.config.uses_text:
                    new_rows.normal_(0.0, self.config.initializer_range)
                elif self.config.fusion == "sum":
                    new_rows.zero_()
                else:
                    new_rows.copy_(items.text_proj(items.text_table()[old + 1 :]))
            grown.weight.requires_grad_(weight.requires_grad)
            items.id_embeddings = grown
        counts = torch.zeros(new_num_items + 1, dtype=self.item_counts.dtype, device=self.item_counts.device)
        counts[: old + 1] = self.item_counts
        self.item_counts = counts
        self.config.num_items = new_num_items
        return self
