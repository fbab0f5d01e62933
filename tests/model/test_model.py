"""Whole-model behaviour: loss at init (§5 item 27), losses, gradients, bad input, MTP, stats."""

import math

import pytest
import torch

from model import ModelArgs, V4Model


def tiny(**kw):
    return ModelArgs.preset("tiny", **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return V4Model(tiny())


def _batch(T=64, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_loss_at_init_is_ln_vocab(model):
    ids, labels = _batch()
    out = model(ids, labels=labels)
    assert set(out.losses) == {"lm", "mtp", "balance", "indexer"}
    assert abs(out.losses["lm"].item() - math.log(512)) < 0.02
    assert abs(out.losses["mtp"].item() - math.log(512)) < 0.02
    assert out.logits.shape == (2, 64, 512) and out.logits.dtype == torch.float32
    assert out.num_tokens == 128
    expect = out.losses["lm"] + 0.3 * out.losses["mtp"] + out.losses["balance"] + out.losses["indexer"]
    assert torch.allclose(out.loss, expect)


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    m = V4Model(tiny()).train()
    ids, labels = _batch()
    m(ids, labels=labels).loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert {n for n, _ in m.named_buffers() if n.endswith(("tid2eid", "gate.bias"))}


def test_ignored_labels_and_mtp_targets():
    torch.manual_seed(0)
    m = V4Model(tiny()).eval()
    ids, labels = _batch(T=32)
    docs = torch.zeros_like(ids)
    docs[:, 20:] = 1
    labels = labels.clone()
    labels[:, 19] = -100
    out = m(ids, labels=labels, doc_ids=docs)
    assert out.num_tokens == 2 * 31
    assert out.mtp_logits.shape == (2, 31, 512)


def test_bias_update_moves_balancing_biases(model):
    torch.manual_seed(0)
    m = V4Model(tiny()).train()
    ids, labels = _batch()
    m(ids, labels=labels)
    score_layers = [moe for moe in m.moe_layers() if not moe.hash_layer]
    assert all(moe.expert_load.sum() == ids.numel() * 2 for moe in score_layers[:-1])
    m.update_balance_biases()
    assert all(moe.gate.bias.abs().sum() > 0 for moe in score_layers)
    assert all(moe.expert_load.sum() == 0 for moe in m.moe_layers())


def test_stats_collected(model):
    ids, _ = _batch(T=32)
    stats = model(ids, collect_stats=True).stats
    n_units = 2 * (model.args.n_layers + 1)
    assert len(stats.sinkhorn_row_error) == n_units and len(stats.max_comb_logit) == n_units
    assert max(stats.sinkhorn_row_error) < 1e-3


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.randint(0, 512, (2, 16)).float(), "dtype"),
    (lambda: torch.full((2, 16), 512), "vocab_size"),
    (lambda: torch.full((2, 16), -1), "vocab_size"),
    (lambda: torch.zeros(2, 513, dtype=torch.long), "max_seq_len"),
    (lambda: torch.zeros(16, dtype=torch.long), "2-D"),
])
def test_bad_input_raises_value_error(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(bad())


def test_bad_doc_ids_and_labels(model):
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="non-decreasing"):
        model(ids, doc_ids=torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]]))
    with pytest.raises(ValueError, match="shape"):
        model(ids, labels=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="routing_override"):
        model(ids, routing_override=[None])


def test_meta_construction_tiny():
    with torch.device("meta"):
        m = V4Model(tiny())
    assert all(p.is_meta for p in m.parameters())


def test_hidden_states_reproduce_logits(model):
    ids, _ = _batch(T=32)
    out = model(ids, return_hidden=True)
    assert torch.allclose(out.hidden @ model.head.weight.t(), out.logits, atol=1e-5)
    teacher = model(ids, return_hidden=True, compute_logits=False)
    assert teacher.logits is None and torch.equal(teacher.hidden, out.hidden)


def test_generate_left_padding_is_invisible():
    """A prompt generated alone and inside a ragged batch gives the same greedy continuation."""
    from model import generate
    torch.manual_seed(0)
    m = V4Model(tiny(qat_fp4_indexer=False))
    g = torch.Generator().manual_seed(3)
    short = torch.randint(3, 512, (9,), generator=g).tolist()
    long = torch.randint(3, 512, (30,), generator=g).tolist()
    alone = generate(m, [short], max_new_tokens=6, temperature=0)
    batch = generate(m, [long, short], max_new_tokens=6, temperature=0)
    assert torch.equal(alone.tokens[0, -6:], batch.tokens[1, -6:])
    assert batch.completion_mask[:, -6:].all() and not batch.completion_mask[:, :30].any()
    sampled = generate(m, [short, long], max_new_tokens=4, temperature=1.0, top_p=0.9,
                       generator=torch.Generator().manual_seed(0))
    assert sampled.tokens.shape == (2, 34)


def test_prefill_then_decode_matches_the_full_forward():
    """Spec §5 item 19: prefill + token-by-token decode (entries emitted when a block completes)
    give the full forward's logits; T spans several CSA/HCA blocks and a partial tail."""
    from model import ModelCache
    torch.manual_seed(0)
    m = V4Model(tiny()).eval()
    ids, _ = _batch(T=45)
    full = m(ids).logits
    cache = ModelCache.empty(m.args.n_layers)
    prefix = 13
    steps = [m(ids[:, :prefix], cache=cache).logits]
    for t in range(prefix, 45):
        steps.append(m(ids[:, t:t + 1], cache=cache).logits)
    decoded = torch.cat(steps, 1)
    err = (decoded - full).abs().max().item()
    assert err < 1e-5, err          # measured 6e-8 (fp32); top-k ties resolve the same way in both
    assert cache.length == 45
