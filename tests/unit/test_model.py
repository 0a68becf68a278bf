"""RecModel: shapes, masking, losses, save/load, scoring, explanations, resizing (tiny configs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from rec_train.config import ConfigError
from rec_train.data.collate import pad_left
from rec_train.model import RecConfig, RecModel, build_config
from rec_train.model.encoders import attention_allowed, relative_buckets

ENCODERS = {
    "llama": {},
    "qwen2": {},
    "gpt2": {},
    "sasrec": {},
    "hstu": {},
    "bert": {"objective": "masked_item"},
}
CAUSAL = ["llama", "qwen2", "gpt2", "sasrec", "hstu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(seed: int = 0, **overrides) -> RecModel:
    torch.manual_seed(seed)
    return RecModel(build_config("tiny", **overrides)).eval()


def next_item_batch(seqs: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids = seq[:-1], labels = seq[1:] (0 under padding), left-padded."""
    input_ids, mask = pad_left([s[:-1] for s in seqs], max_len)
    labels, _ = pad_left([s[1:] for s in seqs], max_len)
    return input_ids, mask, labels


def cyclic_sequences(num_items: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Each user walks the items in order: the next item is always (item % N) + 1."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, num_items + 1, (count,), generator=g).tolist()
    return [[(s - 1 + i) % num_items + 1 for i in range(length)] for s in starts]


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_shapes(encoder: str) -> None:
    model = make(encoder=encoder, **ENCODERS[encoder])
    input_ids, mask, labels = next_item_batch([[1, 2, 3, 4, 5], [6, 7, 8]], 20)
    out = model(input_ids, mask, labels=labels)
    assert out.hidden_states.shape == (2, 4, 16)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model.encode_users(input_ids, mask).shape == (2, 16)
    assert model.item_embeddings().shape == (51, 16)
    ids, scores = model.score(input_ids, mask, k=7)
    assert ids.shape == scores.shape == (2, 7)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


@pytest.mark.parametrize("encoder", CAUSAL)
def test_no_position_sees_a_later_item(encoder: str) -> None:
    model = make(encoder=encoder)
    input_ids, mask = pad_left([[3, 9, 4, 11, 7, 2], [5, 6, 1]], 20)
    changed = input_ids.clone()
    changed[:, -2:] = torch.tensor([[40, 41], [42, 43]])  # the two most recent items
    before = model(input_ids, mask).hidden_states
    after = model(changed, mask).hidden_states
    torch.testing.assert_close(before[:, :-2], after[:, :-2], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, -1], after[:, -1])


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_padding_does_not_change_outputs(encoder: str) -> None:
    model = make(encoder=encoder, **ENCODERS[encoder])
    history = [3, 9, 4, 11, 7]
    short_ids, short_mask = pad_left([history], 20)  # L = 5
    long_ids = torch.cat([torch.zeros(1, 7, dtype=torch.long), short_ids], 1)  # 7 more padding columns
    long_mask = (long_ids != 0).long()
    torch.testing.assert_close(
        model.encode_users(short_ids, short_mask), model.encode_users(long_ids, long_mask), atol=1e-5, rtol=0
    )
    # inside a batch with a longer user, the short user's vector is the same as alone
    batch_ids, batch_mask = pad_left([history, [1, 2, 3, 4, 5, 6, 8, 10]], 20)
    torch.testing.assert_close(
        model.encode_users(batch_ids, batch_mask)[:1],
        model.encode_users(short_ids, short_mask),
        atol=1e-5,
        rtol=0,
    )


def test_full_softmax_only_counts_labelled_positions() -> None:
    model = make()
    input_ids, mask, labels = next_item_batch([[1, 2, 3, 4, 5], [6, 7, 8]], 20)
    out = model(input_ids, mask, labels=labels)
    logits = out.hidden_states @ model.item_embeddings().T  # [B, L, N + 1]
    logits[..., 0] = float("-inf")
    at = labels != 0
    expected = torch.nn.functional.cross_entropy(logits[at], labels[at])
    torch.testing.assert_close(out.loss, expected)
    assert int(at.sum()) == 6  # padding positions carry no loss


LOSSES = {
    "full_softmax": dict(loss="full_softmax"),
    "sampled_in_batch": dict(loss="sampled_softmax", negative_sampler="in_batch", num_negatives=32),
    "sampled_uniform_l2": dict(
        loss="sampled_softmax",
        negative_sampler="uniform",
        num_negatives=16,
        l2_normalize=True,
        temperature=0.1,
    ),
    "sampled_popularity_logq": dict(
        loss="sampled_softmax", negative_sampler="popularity", num_negatives=16, logq_correction=True
    ),
    "sampled_uniform_per_position": dict(
        loss="sampled_softmax", negative_sampler="uniform", num_negatives=8, negatives_per="position"
    ),
    "sampled_popularity_logq_per_position": dict(
        loss="sampled_softmax",
        negative_sampler="popularity",
        num_negatives=8,
        logq_correction=True,
        negatives_per="position",
    ),
    "masked_item": dict(encoder="bert", objective="masked_item", mask_prob=0.5),
    "hstu_sampled": dict(encoder="hstu", loss="sampled_softmax", num_negatives=16),
    "sasrec_full": dict(encoder="sasrec"),
}


def train(model: RecModel, step_loss, steps: int = 40, lr: float = 1e-2) -> tuple[float, float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[:3]) / 3, sum(losses[-3:]) / 3


@pytest.mark.parametrize("name", list(LOSSES))
def test_item_losses_decrease(name: str) -> None:
    model = make(seed=1, num_items=30, **LOSSES[name])
    seqs = cyclic_sequences(30, 64, 10)
    input_ids, mask, labels = next_item_batch(seqs, 20)
    model.set_item_counts(torch.cat([torch.zeros(1), torch.arange(1, 31).float()]))
    first, last = train(model, lambda: model(input_ids, mask, labels=labels).loss, steps=80)
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("head", ["rating", "click"])
def test_pointwise_heads_learn(head: str) -> None:
    model = make(seed=2, num_items=30, pointwise_head=head)
    g = torch.Generator().manual_seed(0)
    histories = torch.randint(1, 31, (64, 6), generator=g)
    candidates = torch.randint(1, 31, (64,), generator=g)
    # the target depends on the candidate: even items are liked
    liked = (candidates % 2 == 0).float()
    targets = 1.0 + 4.0 * liked if head == "rating" else liked
    first, last = train(
        model, lambda: model(histories, candidates=candidates, targets=targets).loss, steps=60
    )
    assert last < 0.5 * first, (first, last)
    logits = model(histories, candidates=candidates).pointwise_logits
    assert logits.shape == (64,)


def test_pointwise_without_head_is_an_error() -> None:
    model = make()
    with pytest.raises(ValueError, match="pointwise_head"):
        model(torch.tensor([[1, 2]]), candidates=torch.tensor([3]), targets=torch.tensor([1.0]))


def test_sampled_softmax_masks_accidental_hits() -> None:
    model = make(loss="sampled_softmax", negative_sampler="in_batch", num_negatives=8)
    input_ids = torch.tensor([[1, 2], [3, 4]])
    labels = torch.tensor([[0, 5], [0, 5]])  # every in-batch negative is the positive itself
    assert model(input_ids, labels=labels).loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("k", [2, 12])  # K x d below and above the 51 rows of the item table
def test_per_position_negatives_match_a_hand_computed_loss(k: int) -> None:
    model = make(
        loss="sampled_softmax",
        negative_sampler="uniform",
        num_negatives=k,
        negatives_per="position",
        l2_normalize=True,
        temperature=0.5,
        item_representation="id+text",
        text_dim=8,
    )
    model.set_item_text_embeddings(torch.randn(51, 8))
    input_ids, _, labels = next_item_batch([[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]], 6)
    labels[0, -1] = 40  # so that some negatives can hit the target
    torch.manual_seed(7)
    out = model(input_ids, labels=labels)
    torch.manual_seed(7)
    targets = labels[labels != 0].tolist()
    negatives = torch.randint(1, 51, (len(targets), k)).tolist()  # a row of its own for every position
    assert len({tuple(row) for row in negatives}) == len(targets)
    users = out.hidden_states[labels != 0].detach().numpy()
    table = model.item_embeddings().detach().numpy()
    expected = []
    for user, target, row in zip(users, targets, negatives, strict=True):
        user = user / np.linalg.norm(user) / 0.5
        logits = [user @ table[target]] + [user @ table[n] for n in row if n != target]
        expected.append(np.log(np.exp(logits).sum()) - logits[0])
    assert out.loss.item() == pytest.approx(float(np.mean(expected)), rel=1e-5)


def test_exclude_history_leaves_earlier_items_out_of_the_full_softmax() -> None:
    model = make(exclude_history=True, l2_normalize=True, temperature=0.5)
    seqs = [[1, 2, 3, 2, 4], [6, 7, 8]]  # item 2 comes back: a target it stays, once seen
    input_ids, mask, labels = next_item_batch(seqs, 6)
    out = model(input_ids, mask, labels=labels)
    users = out.hidden_states[labels != 0].detach().numpy()
    table = model.item_embeddings().detach().numpy()
    expected = []
    for user, (seq, t) in zip(users, [(s, t) for s in seqs for t in range(len(s) - 1)], strict=True):
        target, seen = seq[t + 1], set(seq[: t + 1]) - {seq[t + 1]}
        logits = table[1:] @ (user / np.linalg.norm(user) / 0.5)  # items 1..N
        kept = [i for i in range(1, len(table)) if i not in seen]
        expected.append(np.log(np.exp(logits[np.array(kept) - 1]).sum()) - logits[target - 1])
    assert out.loss.item() == pytest.approx(float(np.mean(expected)), rel=1e-5)
    plain = make(l2_normalize=True, temperature=0.5)  # same seed, same weights
    assert plain(input_ids, mask, labels=labels).loss.item() > out.loss.item()  # fewer negatives


@pytest.mark.parametrize("encoder", ["llama", "sasrec"])
def test_scale_embedding_multiplies_item_vectors_by_the_square_root_of_the_width(encoder: str) -> None:
    scaled = make(encoder=encoder, scale_embedding=True)
    plain = make(encoder=encoder)
    plain.load_state_dict(scaled.state_dict())
    input_ids, mask = pad_left([[1, 2, 3], [4, 5, 6, 7]], 8)
    before = plain(input_ids, mask).hidden_states
    with torch.no_grad():
        plain.items.id_embeddings.weight.mul_(16**0.5)  # d = 16
    torch.testing.assert_close(scaled(input_ids, mask).hidden_states, plain(input_ids, mask).hidden_states)
    assert not torch.allclose(before, plain(input_ids, mask).hidden_states)


def test_llama_blocks_drop_their_attention_and_mlp_outputs_in_training_only() -> None:
    encoder = make(encoder="llama", hidden_dropout=0.5).encoder
    x = torch.randn(2, 6, 16)  # [B, L, D]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = mask.cumsum(-1).clamp(min=1) - 1
    evaluated = encoder(x, mask, positions)
    expected, rotary = x, encoder.rotary_emb(x, positions)  # the Hugging Face layers' own forward
    for layer in encoder.layers:
        expected = layer(
            expected, attention_mask=attention_allowed(mask, causal=True), position_embeddings=rotary
        )
    torch.testing.assert_close(evaluated, encoder.norm(expected))
    encoder.train()
    torch.manual_seed(0)
    first = encoder(x, mask, positions)
    torch.manual_seed(1)
    assert not torch.allclose(first, encoder(x, mask, positions))
    torch.manual_seed(0)
    torch.testing.assert_close(first, encoder(x, mask, positions))
    encoder.dropout.p = 0.0
    torch.testing.assert_close(encoder(x, mask, positions), evaluated)


def test_popularity_negatives_need_counts() -> None:
    model = make(loss="sampled_softmax", negative_sampler="popularity")
    with pytest.raises(ValueError, match="set_item_counts"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[2, 3]]))


def test_save_load_round_trip(tmp_path) -> None:
    model = make(item_representation="id+text", fusion="gate", text_dim=8, pointwise_head="click")
    model.set_item_text_embeddings(torch.randn(51, 8))
    model.set_item_counts(torch.arange(51).float())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RecModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RecConfig)
    assert {**loaded.config.to_dict(), "_name_or_path": ""} == {**model.config.to_dict(), "_name_or_path": ""}
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    input_ids, mask = pad_left([[1, 2, 3], [4, 5, 6, 7, 8]], 20)
    a, b = model.score(input_ids, mask, k=10), loaded.score(input_ids, mask, k=10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_top_k_exclusions() -> None:
    model = make(num_items=12)
    input_ids, mask = pad_left([[1, 2, 3], [4]], 20)
    ids, scores = model.score(input_ids, mask, k=12, exclude=[[5, 6], []])
    for row, banned in zip(ids.tolist(), [{1, 2, 3, 5, 6}, {4}], strict=True):
        finite = row[: 12 - len(banned)]
        assert 0 not in finite and not banned & set(finite)
        assert sorted(finite) == sorted(set(range(1, 13)) - banned)
    assert torch.isinf(scores[0, -len({1, 2, 3, 5, 6}) :]).all()
    ids, _ = model.score(input_ids, mask, k=12, exclude_history=False)
    assert set(ids[0].tolist()) == set(range(1, 13))  # history allowed, padding still never


def test_explain_names_the_most_similar_history_items() -> None:
    model = make(num_items=12)
    with torch.no_grad():
        table = model.items.id_embeddings.weight
        table[1:] = torch.eye(16)[:12] * 3  # items 1..12 orthogonal
        table[10] = table[3] * 2 + table[7]  # item 10 looks like 3, then a bit like 7
    input_ids, mask = pad_left([[3, 7, 5, 3], [1]], 20)
    names = model.explain(input_ids, mask, torch.tensor([[10], [10]]), n=3)
    assert names.shape == (2, 1, 3)
    assert names[0, 0, :2].tolist() == [3, 7]  # 3 listed once though watched twice
    assert names[1, 0].tolist() == [1, 0, 0]  # a one-item history explains with that item only


def test_cold_start_item_is_scored_from_its_text() -> None:
    # items 1-10 share text "A", items 11-20 text "B"; users only ever move within one group
    torch.manual_seed(3)
    dim = 8
    text = torch.zeros(21, dim)
    text[1:11], text[11:21] = torch.randn(dim), torch.randn(dim)
    text[1:] += 0.05 * torch.randn(20, dim)
    model = make(seed=3, num_items=20, item_representation="id+text", fusion="sum", text_dim=dim)
    model.set_item_text_embeddings(text)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(1, 11, (8,), generator=g) + 10 * (u % 2)).tolist() for u in range(64)]
    input_ids, mask, labels = next_item_batch(seqs, 20)
    train(model, lambda: model(input_ids, mask, labels=labels).loss, steps=60)
    # two new items nobody has seen: one with group A text, one with group B text
    grown = torch.cat(
        [text, text[1:2] + 0.05 * torch.randn(1, dim), text[11:12] + 0.05 * torch.randn(1, dim)]
    )
    model.resize_items(22, text_embeddings=grown)
    user_a, mask_a = pad_left([[1, 2, 3, 4, 5]], 20)
    user_b, mask_b = pad_left([[11, 12, 13, 14, 15]], 20)
    scores_a = model.encode_users(user_a, mask_a) @ model.item_embeddings().T
    scores_b = model.encode_users(user_b, mask_b) @ model.item_embeddings().T
    assert scores_a[0, 21] > scores_a[0, 22]
    assert scores_b[0, 22] > scores_b[0, 21]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(item_representation="id+text", fusion="sum", text_dim=4),
        dict(item_representation="id+text", fusion="gate", text_dim=4),
        dict(item_representation="text", text_dim=4),
    ],
)
def test_resize_items_keeps_old_rows(overrides: dict) -> None:
    model = make(num_items=10, **overrides)
    text = torch.randn(11, 4)
    if model.config.uses_text:
        model.set_item_text_embeddings(text)
    before = model.item_embeddings()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grown_text = torch.cat([torch.randn(11, 4), torch.randn(5, 4)])  # old rows differ: they must be kept
    model.resize_items(15, text_embeddings=grown_text if model.config.uses_text else None)
    assert model.config.num_items == 15
    after = model.item_embeddings()
    assert after.shape == (16, 16)
    torch.testing.assert_close(after[:11], before, atol=0, rtol=0)
    for key, value in model.state_dict().items():
        if value.shape == weights[key].shape:
            assert torch.equal(value, weights[key]), key
    if model.config.uses_text:
        new_from_text = model.items.text_proj(grown_text[11:])
        if model.config.fusion in ("sum", "gate") or not model.config.uses_ids:
            torch.testing.assert_close(after[11:], new_from_text)
    with pytest.raises(ValueError, match="grow"):
        model.resize_items(5)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="did you mean 'num_items'"):
        build_config("tiny", num_itmes=5)
    with pytest.raises(ConfigError, match="model.encoder='gru'"):
        build_config("tiny", encoder="gru")
    with pytest.raises(ConfigError, match="text_dim"):
        build_config("tiny", item_representation="text")
    with pytest.raises(ConfigError, match="model.negatives_per='user'"):
        build_config("tiny", negatives_per="user")
    with pytest.raises(ConfigError, match="model.exclude_history=true needs model.loss='full_softmax'"):
        build_config("tiny", exclude_history=True, loss="sampled_softmax")
    with pytest.raises(ConfigError, match="unknown model size"):
        build_config("huge")


def test_config_values_take_their_annotated_types() -> None:
    config = build_config("tiny", hidden_size=32.0, norm_eps="1e-8", backbone_hidden_size="64")
    assert (config.hidden_size, config.norm_eps, config.backbone_hidden_size) == (32, 1e-8, 64)
    assert type(config.hidden_size) is int and type(config.norm_eps) is float
    with pytest.raises(ConfigError, match=r"model.hidden_size='sixty' is not a valid int"):
        build_config("tiny", hidden_size="sixty")
    with pytest.raises(ConfigError, match=r"model.num_key_value_heads=1.5 is not a valid int \| None"):
        build_config("tiny", num_key_value_heads=1.5)


def test_model_package_imports_neither_ray_nor_deepspeed() -> None:
    import subprocess
    import sys

    code = (
        "import sys, torch, rec_train.model, rec_train.model.text, rec_train.model.pretrained, "
        "rec_train.model.peft_utils\n"
        "m = rec_train.model.RecModel(rec_train.model.build_config('tiny')).eval()\n"
        "m.score(torch.tensor([[1, 2]]), k=3)\n"
        "print(sorted(n for n in ('ray', 'deepspeed') if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_relative_buckets_are_exact_near_log_spaced_far_and_zero_for_the_future() -> None:
    buckets = relative_buckets(200, num_buckets=32, max_distance=200, device=torch.device("cpu"))  # [L, L]
    assert buckets.shape == (200, 200)
    assert buckets[5, 5] == 0 and buckets[20, 5] == 15 and buckets[3, 10] == 0  # the future: bucket 0
    far = buckets[199, :].flip(0)  # distances 0..199
    assert torch.equal(far[:16], torch.arange(16))
    assert bool((far[1:] >= far[:-1]).all()) and int(far.max()) == 31 and int(far[16]) == 16
    assert torch.equal(buckets[50:, 50:], buckets[:150, :150])  # depends on the distance only
