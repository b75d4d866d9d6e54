"""The GradBuffer's data-parallel side: the bucket layout (buffer.layout, GradBuffer(bucket_bytes,
bucket_multiple)), the contribution hook that signals readiness during backward, and the window bookkeeping
a reduction relies on (mark_received, finish_window(params))."""

import random

import pytest
import torch
import torch.nn.functional as F

import memengine as me
from memengine.grad.buffer import ALIGNMENT, GradBuffer, layout


def meta_parameters(sizes):
    return [torch.empty(size, device="meta") for size in sizes]


def check_layout(params, bucket_numel, bucket_multiple):
    offsets, total, buckets = layout(params, bucket_numel, bucket_multiple)
    # every parameter starts aligned, after the previous one, without overlap
    assert all(offset % ALIGNMENT == 0 for offset in offsets)
    ends = [offset + p.numel() for offset, p in zip(offsets, params, strict=True)]
    assert all(start >= end for start, end in zip(offsets[1:], ends, strict=False))
    # buckets tile [0, total) in index order and hold the parameters in order
    assert [bucket.index for bucket in buckets] == list(range(len(buckets)))
    assert buckets[0].start == 0 and buckets[-1].end == total
    assert all(a.end == b.start for a, b in zip(buckets, buckets[1:], strict=False))
    assert [p for bucket in buckets for p in bucket.params] == params
    offset_of = {id(p): offset for p, offset in zip(params, offsets, strict=True)}
    for bucket in buckets:
        # whole parameters only (a bucket ends on a parameter boundary, plus padding)
        assert all(
            bucket.start <= offset_of[id(p)] and offset_of[id(p)] + p.numel() <= bucket.end for p in bucket.params
        )
        if bucket_numel is None:
            assert len(buckets) == 1 and total == ends[-1]  # one bucket, unpadded
            continue
        # padded to split into bucket_multiple aligned shards
        assert bucket.numel % (ALIGNMENT * bucket_multiple) == 0
        used = offset_of[id(bucket.params[-1])] + bucket.params[-1].numel() - bucket.start
        assert bucket.numel - used < ALIGNMENT * bucket_multiple
        # a bucket closes at the first parameter that brings it to bucket_numel (the last bucket may hold less)
        if len(bucket.params) > 1:
            before_last = bucket.params[-2]
            assert offset_of[id(before_last)] + before_last.numel() - bucket.start < bucket_numel
        if bucket is not buckets[-1]:
            assert used >= bucket_numel
    return offsets, total, buckets


def random_layouts(count=200, seed=0):
    """(sizes, bucket_numel, bucket_multiple) drawn at random: up to 12 parameters of 1-700 elements, no
    buckets or buckets of 1-2000 elements, 1-5 shards."""
    generator = random.Random(seed)
    for _ in range(count):
        sizes = [generator.randint(1, 700) for _ in range(generator.randint(1, 12))]
        bucket_numel = None if generator.random() < 0.2 else generator.randint(1, 2000)
        yield sizes, bucket_numel, generator.randint(1, 5)


def test_layout_tiles_the_buffer_with_whole_parameter_buckets():
    for sizes, bucket_numel, bucket_multiple in random_layouts():
        check_layout(meta_parameters(sizes), bucket_numel, bucket_multiple)


def test_layout_examples():
    # 100 -> [0, 100); 30 -> [128, 158) closes bucket 0 (158 >= 150), padded to 256 (a multiple of 2 x 64);
    # 500 -> [256, 756) closes bucket 1, padded to 768; 10 -> [768, 778), the last bucket, padded to 896
    offsets, total, buckets = layout(meta_parameters([100, 30, 500, 10]), bucket_numel=150, bucket_multiple=2)
    assert offsets == [0, 128, 256, 768]
    assert [(b.start, b.end, len(b.params)) for b in buckets] == [(0, 256, 2), (256, 768, 1), (768, 896, 1)]
    assert total == 896
    # a parameter larger than a bucket gets a bucket of its own, never split
    _, _, buckets = layout(meta_parameters([10, 5000, 10]), bucket_numel=100)
    assert [len(b.params) for b in buckets] == [2, 1]
    assert buckets[0].numel == 64 + 5000 + 56  # 10 padded to 64, then 5000 padded up to a multiple of 64


class Model(torch.nn.Module):
    def __init__(self, width=24, vocab=40):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.up = torch.nn.Linear(width, 3 * width)
        self.down = torch.nn.Linear(3 * width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.unused = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # a fused use and an autograd use

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.down(F.gelu(self.up(x)))
        return self.head(self.norm(x))


def loss_of(model, seed=0):
    tokens = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(seed))
    return F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten(), reduction="sum")


def test_grad_buffer_buckets_hold_the_main_grad_views():
    torch.manual_seed(0)
    model = Model()
    buffer = GradBuffer(model, bucket_bytes=4 * 1000, bucket_multiple=3)
    registered = [p for p in model.parameters()]
    assert buffer.params == registered[::-1]  # buffer order: the order backward produces gradients
    assert len(buffer.buckets) >= 3
    check_layout(buffer.params, 1000, 3)
    assert buffer.data.numel() == buffer.buckets[-1].end
    data = buffer.data.data_ptr()
    for bucket in buffer.buckets:
        for p in bucket.params:
            start = (p.main_grad.data_ptr() - data) // buffer.data.element_size()
            assert bucket.start <= start and start + p.numel() <= bucket.end
    loss_of(model).backward()
    covered = torch.zeros_like(buffer.data, dtype=torch.bool)
    for p, offset in zip(buffer.params, buffer.offsets, strict=True):
        covered[offset : offset + p.numel()] = True
    assert torch.all(buffer.data[~covered] == 0)  # alignment and bucket padding are never written


@pytest.mark.parametrize(("keyword", "value"), [("bucket_bytes", 0), ("bucket_multiple", 0)])
def test_grad_buffer_refuses_bad_bucket_arguments(keyword, value):
    with pytest.raises(ValueError, match=keyword):
        GradBuffer(Model(), **{keyword: value})


def test_without_bucket_bytes_one_unpadded_bucket():
    buffer = GradBuffer(Model())
    assert len(buffer.buckets) == 1
    bucket = buffer.buckets[0]
    assert (bucket.start, bucket.end, bucket.params) == (0, buffer.data.numel(), buffer.params)
    assert buffer.data.numel() == buffer.offsets[-1] + buffer.params[-1].numel()


def test_contribution_hook_runs_as_each_contribution_lands():
    """The hook sees main_grad after every contribution: its last call for a parameter sees the final gradient,
    the tied weight's first call (the fused head) sees only part of it, an unused parameter is never seen,
    and a removed hook is not called."""
    torch.manual_seed(0)
    model = Model()
    buffer = me.patch(model)
    seen = {}

    def record(p):
        seen.setdefault(id(p), []).append(p.main_grad.clone())

    handle = buffer.register_contribution_hook(record)
    loss_of(model).backward()
    trained = [p for p in buffer.params if p not in set(model.unused.parameters())]
    assert set(seen) == {id(p) for p in trained}
    for p in trained:
        assert torch.equal(seen[id(p)][-1], p.main_grad)
    tied = seen[id(model.embed.weight)]
    assert not torch.equal(tied[0], tied[-1])  # the head's fused part first, the embedding's part later
    handle.remove()
    seen.clear()
    buffer.start_window()
    loss_of(model).backward()
    assert seen == {}


def test_finish_window_zeroes_only_the_given_parameters_without_a_gradient():
    torch.manual_seed(0)
    model = Model()
    buffer = me.patch(model)
    buffer.data.fill_(3.0)  # a previous window's values
    buffer.start_window()
    model.up(torch.randn(2, 24)).sum().backward()  # only up receives gradients
    up_gradient = model.up.weight.main_grad.clone()
    assert buffer.finish_window([model.down.weight, model.up.weight]) == [model.down.weight]
    assert torch.all(model.down.weight.main_grad == 0)
    assert torch.equal(model.up.weight.main_grad, up_gradient)
    assert torch.all(model.down.bias.main_grad == 3.0)  # not among the given parameters: left alone
    empty = {id(p) for p in buffer.finish_window()}
    assert id(model.down.bias) in empty and id(model.up.weight) not in empty
    assert torch.all(model.down.bias.main_grad == 0)


def test_mark_received_keeps_a_gradient_brought_in_from_elsewhere():
    """What a reduction does for a parameter another rank trained: its slice holds a gradient of this window
    although no contribution landed here, so .grad is the view and finish_window leaves it."""
    torch.manual_seed(0)
    model = Model()
    buffer = me.patch(model)
    buffer.start_window()
    p = model.unused.weight
    assert not buffer.received_gradient(p)
    p.main_grad.fill_(2.0)  # the reduced values
    buffer.mark_received(p)
    assert buffer.received_gradient(p)
    assert p.grad is not None and p.grad.data_ptr() == p.main_grad.data_ptr()
    assert [id(q) for q in buffer.finish_window([p, model.unused.bias])] == [id(model.unused.bias)]
    assert torch.all(p.main_grad == 2.0)
    # a contribution later in the same window adds to it (the window is not reopened)
    model.unused(torch.ones(1, 24)).sum().backward()
    assert torch.all(p.main_grad == 3.0)
    # clearing .grad opens a new window for it, as for any parameter
    model.zero_grad()
    assert not buffer.received_gradient(p)
