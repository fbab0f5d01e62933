"""The teacher pool with 24 tiny teachers (spec opd-and-fused-loss §8, §11 case 9; issue 8 tests).

Grouping teachers (one distill_kl call and one stacked head per group) must equal running each
teacher on its own samples, whatever the group size, the offload mode or the order of the rows;
a teacher with another vocabulary or tokenizer is refused.
"""

import dataclasses
import json

import pytest
import torch
from tokenizers import Tokenizer

from distill.config import LossConfig, TeacherPoolConfig
from distill.loss import opd_loss
from distill.opd import per_teacher_means
from distill.rollout import RolloutBatch
from distill.teachers import TeacherPool, TeacherSpec, read_manifest, write_manifest
from model import ModelArgs
from tests.distill.helpers import make_teachers

N_TEACHERS, ROWS_PER_TEACHER, LENGTH = 24, 2, 10
# fp32, torch reference: measured max rel err 1.3e-7 (loss) and 2.5e-7 of max |grad| across groupings
LOSS_RTOL, GRAD_RTOL = 2e-6, 2e-6


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer_dir):
    return make_teachers(tmp_path_factory.mktemp("teachers"), N_TEACHERS, tokenizer_dir)


@pytest.fixture(scope="module")
def student_fingerprint(small_data):
    return small_data.tokenizer.fingerprint


def pool_of(specs, fingerprint, **cfg):
    return TeacherPool(specs, TeacherPoolConfig(**cfg), ModelArgs.preset("tiny"), fingerprint, torch.device("cpu"))


def random_batch(seed=0):
    """Rows of random tokens with left padding and a completion mask, two rows per teacher, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    rows = N_TEACHERS * ROWS_PER_TEACHER
    inputs = torch.randint(3, 512, (rows, LENGTH), generator=gen)
    pad = torch.randint(0, 4, (rows,), generator=gen)
    positions = torch.arange(LENGTH)
    doc_ids = (positions[None, :] >= pad[:, None]).long()
    inputs = torch.where(doc_ids == 0, torch.full_like(inputs, 2), inputs)
    loss_mask = (positions[None, :] >= LENGTH - 5) & (torch.rand(rows, LENGTH, generator=gen) < 0.9)
    owners = torch.arange(N_TEACHERS).repeat(ROWS_PER_TEACHER)[torch.randperm(rows, generator=gen)]
    targets = torch.randint(3, 512, (rows, LENGTH), generator=gen)
    return RolloutBatch(inputs=inputs, doc_ids=doc_ids, targets=targets, loss_mask=loss_mask, teacher_of_row=owners,
                        sampled_tokens=int(loss_mask.sum()))


def student_leaves(seed=1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_TEACHERS * ROWS_PER_TEACHER * LENGTH, 64, generator=gen)
    head = torch.randn(512, 64, generator=gen) * 0.2
    return hidden, head


def run_loss(pool, batch, hidden, head, kind="reverse"):
    hidden, head = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    out = opd_loss(hidden, head, pool.teacher_groups(batch), batch.targets.reshape(-1), int(batch.loss_mask.sum()),
                   LossConfig(kind=kind), impl="torch")
    out.loss.backward()
    return out, hidden.grad, head.grad


def close(ours, theirs, rtol):
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= rtol * scale, f"max abs err {err:.3e} vs max |value| {scale:.3e}"


def sub_batch(batch, rows):
    return RolloutBatch(inputs=batch.inputs[rows], doc_ids=batch.doc_ids[rows], targets=batch.targets[rows],
                        loss_mask=batch.loss_mask[rows], teacher_of_row=batch.teacher_of_row[rows],
                        sampled_tokens=int(batch.loss_mask[rows].sum()))


def test_grouped_24_teachers_equal_each_teacher_alone_and_ignore_row_order(teachers, student_fingerprint):
    batch = random_batch()
    hidden, head = student_leaves()
    n_valid = int(batch.loss_mask.sum())

    pool = pool_of(teachers, student_fingerprint, group_size=N_TEACHERS)
    assert pool.plan(batch.teacher_of_row.tolist()) == [list(range(N_TEACHERS))]
    grouped, grad_hidden, grad_head = run_loss(pool, batch, hidden, head)
    per_teacher = per_teacher_means(grouped.reverse_kl, grouped.teacher_of_position, pool.names)
    assert sorted(per_teacher) == pool.names and min(per_teacher.values()) > 0.1  # every teacher scored, KL not trivial

    # each teacher on its own rows, with a pool that brings in one teacher at a time
    single = pool_of(teachers, student_fingerprint, group_size=1)
    loss_sum, grad_hidden_alone, grad_head_alone = 0.0, torch.zeros_like(hidden), torch.zeros_like(head)
    per_row = hidden.view(batch.inputs.shape[0], LENGTH, -1)
    for teacher in range(N_TEACHERS):
        rows = (batch.teacher_of_row == teacher).nonzero().flatten()
        part = sub_batch(batch, rows)
        out, g_hidden, g_head = run_loss(single, part, per_row[rows].reshape(-1, hidden.shape[1]), head)
        count = int(part.loss_mask.sum())
        loss_sum += out.loss.item() * count
        grad_hidden_alone.view_as(per_row)[rows] = g_hidden.view(len(rows), LENGTH, -1) * count / n_valid
        grad_head_alone += g_head * count / n_valid
        assert out.loss.item() == pytest.approx(per_teacher[pool.names[teacher]], rel=LOSS_RTOL)
    assert grouped.loss.item() == pytest.approx(loss_sum / n_valid, rel=LOSS_RTOL)
    close(grad_hidden, grad_hidden_alone, GRAD_RTOL)
    close(grad_head, grad_head_alone, GRAD_RTOL)

    # the same samples in another row order, teachers brought in 5 at a time (5 groups, the last
    # one of 4) and read from disk each time
    disk = pool_of(teachers, student_fingerprint, group_size=5, offload="disk")
    assert [len(g) for g in disk.plan(batch.teacher_of_row.tolist())] == [5, 5, 5, 5, 4]
    perm = torch.randperm(batch.inputs.shape[0], generator=torch.Generator().manual_seed(7))
    shuffled = sub_batch(batch, perm)
    out_p, g_hidden_p, g_head_p = run_loss(disk, shuffled, per_row[perm].reshape(-1, hidden.shape[1]), head)
    assert out_p.loss.item() == pytest.approx(grouped.loss.item(), rel=LOSS_RTOL)
    unshuffled = torch.empty_like(g_hidden_p.view_as(per_row))
    unshuffled[perm] = g_hidden_p.view_as(per_row)
    close(unshuffled.reshape_as(grad_hidden), grad_hidden, GRAD_RTOL)
    close(g_head_p, grad_head, GRAD_RTOL)


def test_teachers_ship_bf16_hidden_states_that_rebuild_their_logits(teachers, student_fingerprint):
    batch = random_batch(3)
    part = sub_batch(batch, (batch.teacher_of_row < 2).nonzero().flatten())
    # logits within ±20; measured max abs err of hidden · headᵀ against the teacher's own logits:
    # 3e-6 with fp32 hidden states (batch-size rounding only), 0.06 with bf16 (8-bit mantissa)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 0.15)):
        pool = pool_of(teachers[:2], student_fingerprint, hidden_dtype=dtype)
        (group,) = list(pool.teacher_groups(part))
        assert group.hidden.dtype == getattr(torch, dtype) and group.heads.shape == (2, 512, 64)
        for local in range(2):
            with pool.materialize([local]) as (model,):
                logits = model(part.inputs, doc_ids=part.doc_ids).logits.reshape(-1, 512)
            mine = group.local_ids == local
            rebuilt = group.hidden[mine].float() @ group.heads[local].T
            err = (rebuilt - logits[group.positions[mine]]).abs().max().item()
            assert err < tol, f"{dtype} teacher {local}: max abs err {err:.3e}"


def test_teacher_with_another_vocabulary_or_tokenizer_is_refused(tmp_path, teachers, tokenizer_dir,
                                                                  student_fingerprint):
    (wide,) = make_teachers(tmp_path / "wide", 1, tokenizer_dir, vocab_size=600)
    wide = dataclasses.replace(wide, name="wide")
    with pytest.raises(ValueError) as err:
        pool_of([teachers[0], wide], student_fingerprint)
    message = str(err.value)
    assert "vocab_size=600" in message and "vocab_size=512" in message and "wide" in message
    assert "\n" not in message

    other_tokenizer = tmp_path / "other-tokenizer"
    other_tokenizer.mkdir()
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_tokens(["<tool>"])  # one more token: a different tokenizer
    tokenizer.save(str(other_tokenizer / "tokenizer.json"))
    (other_tokenizer / "tokenizer_config.json").write_text((tokenizer_dir / "tokenizer_config.json").read_text())
    renamed = dataclasses.replace(teachers[1], tokenizer=str(other_tokenizer))
    with pytest.raises(ValueError, match=r"teacher 't01' has vocab_size=512 and tokenizer .* but the student has "
                                         r"vocab_size=512 and tokenizer"):
        pool_of([renamed], student_fingerprint)


def test_manifest_round_trip_and_errors(tmp_path, teachers):
    path = tmp_path / "teachers.json"
    write_manifest(path, teachers[:3])
    assert read_manifest(path) == teachers[:3]
    path.write_text(json.dumps([{"name": "a", "domain": "math"}]))
    with pytest.raises(ValueError, match="name, domain, checkpoint, tokenizer"):
        read_manifest(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(tmp_path / "missing.json")
    duplicate = [teachers[0], TeacherSpec(**{**dataclasses.asdict(teachers[1]), "name": "t00"})]
    write_manifest(path, duplicate)
    with pytest.raises(ValueError, match="unique names"):
        read_manifest(path)
