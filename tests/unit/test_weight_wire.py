"""The wire's two ends over a real gloo group inside one process (two ranks, one thread each):
pipelined sends from a ring of reused buffers, every receive posted at once into buffers kept
across syncs, and a reader (the learner's checksums) that runs alongside each broadcast."""

import datetime
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist

from fleetrl.core.weight_check import tensor_checksum
from fleetrl.core.weight_wire import (
    BucketSender,
    FlatBuffers,
    contiguous_view,
    memory_runs,
    pack_bucket,
    plan_buckets,
    receive_buckets,
    stream_buckets,
    unpack_bucket,
)


def gloo_pair() -> tuple:
    store = dist.HashStore()
    groups: dict[int, object] = {}

    def join(rank: int) -> None:
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=60))

    threads = [threading.Thread(target=join, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return groups[0], groups[1]


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(40, 8, generator=g), "norm": torch.randn(8, generator=g),
            "q": torch.randn(16, 8, generator=g), "mlp": torch.randn(64, 8, generator=g),
            "head": torch.randn(24, 8, generator=g)}


def test_pipelined_sends_arrive_whole_through_reused_buffers_on_both_ends():
    sender_group, receiver_group = gloo_pair()
    specs = [(n, tuple(t.shape), t.dtype) for n, t in weights(0).items()]
    plan = plan_buckets(specs, 1, bucket_bytes=400 * 4)  # 4 buckets: more than the ring's 2 slots
    assert len(plan.buckets) == 4
    sender = BucketSender(sender_group, "cpu", depth=2)
    received = FlatBuffers("cpu")
    pool = ThreadPoolExecutor(1)
    pointers = []
    try:
        for seed in (0, 1):
            sent = weights(seed)
            sums: dict[str, tuple] = {}

            def read(flat, bucket, sums=sums):
                return pool.submit(lambda: sums.update({n: tensor_checksum(t) for n, t in unpack_bucket(bucket, flat)}))

            def send(sent=sent):
                for b in plan.buckets:
                    sender.send(b, sent, reader=lambda flat, b=b: read(flat, b))
                sender.finish()

            t = threading.Thread(target=send)
            t.start()
            got = dict(receive_buckets(receiver_group, plan, received))
            t.join()
            assert set(got) == set(sent)
            for name, tensor in sent.items():
                assert torch.equal(got[name], tensor), name
                assert sums[name] == tensor_checksum(tensor), name  # read from the packed bucket
            pointers.append(sorted(received._bufs[i].data_ptr() for i in range(len(plan.buckets)))
                            + sorted(sender.buffers._bufs[s].data_ptr() for s in range(2)))
        assert pointers[0] == pointers[1]  # the second sync allocated nothing on either end
        assert received.num_bytes == plan.num_bytes
    finally:
        pool.shutdown()


def test_buffers_grow_for_a_bigger_bucket_and_packing_refuses_a_wrong_buffer():
    plan = plan_buckets([("a", (4,), torch.float32), ("b", (6,), torch.float32)], 1, bucket_bytes=16)
    small, big = plan.buckets
    buffers = FlatBuffers("cpu")
    first = buffers.get(0, small)
    assert first.shape == (4,) and buffers.get(0, small).data_ptr() == first.data_ptr()
    assert buffers.get(0, big).shape == (6,)  # grown
    assert buffers.get(0, small).shape == (4,)  # a view of the grown one
    with pytest.raises(ValueError, match="needs torch.float32 \\(6,\\).*FlatBuffers.get"):
        pack_bucket(big, {"b": torch.ones(6)}, out=torch.empty(4))
    with pytest.raises(ValueError, match="depth=0"):
        BucketSender(None, "cpu", depth=0)


def flat_groups(seed: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """``weights(seed)`` laid out as ZeRO-1/2 lay out parameter groups: views of one flat buffer per
    group (matrices; then the 1-D tensors), each group in the model's order."""
    w = weights(seed)
    groups = [[n for n, t in w.items() if t.dim() > 1], [n for n, t in w.items() if t.dim() == 1]]
    views, flats = {}, []
    for names in groups:
        flat = torch.cat([w[n].reshape(-1) for n in names])
        flats.append(flat)
        off = 0
        for n in names:
            views[n] = flat[off:off + w[n].numel()].view(w[n].shape)
            off += w[n].numel()
    return views, flats


def test_buckets_that_follow_a_flat_buffer_go_on_the_wire_unpacked():
    views, flats = flat_groups(0)
    runs = memory_runs(list(views.items()))
    assert sorted(map(sorted, runs)) == [["embed", "head", "mlp", "q"], ["norm"]]
    assert [n for run in runs for n in run if n != "norm"] == ["embed", "q", "mlp", "head"]  # memory order
    # A plan in memory order with a break between the runs: every bucket is one view, no copy.
    order = [n for run in sorted(runs, key=len) for n in run]
    plan = plan_buckets([(n, tuple(views[n].shape), torch.float32) for n in order], 1, bucket_bytes=700 * 4,
                        breaks={sorted(runs, key=len)[1][0]})
    for b in plan.buckets:
        flat = contiguous_view(b, views)
        assert flat is not None and flat.numel() == b.numel
        assert any(flat.data_ptr() >= f.data_ptr() and flat.data_ptr() < f.data_ptr() + f.nbytes for f in flats)
        assert dict((n, t) for n, t in unpack_bucket(b, flat)).keys() == {s.name for s in b.specs}
        for name, t in unpack_bucket(b, flat):
            assert torch.equal(t, views[name])
    # Not the bucket's layout (the model's order crosses the two buffers), or a copy: packed instead.
    model_order = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in views.items()], 1, bucket_bytes=10**6)
    assert contiguous_view(model_order.buckets[0], views) is None
    several = next(b for b in plan.buckets if len(b.specs) > 1)
    assert contiguous_view(several, {n: t.clone() for n, t in views.items()}) is None  # separate copies

    sender_group, receiver_group = gloo_pair()
    sender = BucketSender(sender_group, "cpu")
    received = FlatBuffers("cpu")
    for seed, in_place in ((0, True), (1, False)):
        sent = flat_groups(seed)[0]
        before = sender.unpacked

        def send(sent=sent, in_place=in_place):
            for b in plan.buckets:
                sender.send(b, sent, in_place=in_place)
            sender.finish()

        t = threading.Thread(target=send)
        t.start()
        got = dict(receive_buckets(receiver_group, plan, received))
        t.join()
        assert sender.unpacked - before == (len(plan.buckets) if in_place else 0)
        assert all(torch.equal(got[n], sent[n]) for n in sent)


def test_a_streamed_receive_hands_on_each_bucket_before_the_next_is_sent():
    sender_group, receiver_group = gloo_pair()
    sent = weights(0)
    plan = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in sent.items()], 1, bucket_bytes=400 * 4)
    first_taken = threading.Event()
    order = []
    sender = BucketSender(sender_group, "cpu")

    def send():
        sender.send(plan.buckets[0], sent)
        assert first_taken.wait(30), "bucket 0 never reached the consumer"
        order.append("rest sent")
        for b in plan.buckets[1:]:
            sender.send(b, sent)
        sender.finish()

    t = threading.Thread(target=send)
    t.start()
    got = {}
    for name, tensor in stream_buckets(receiver_group, plan, FlatBuffers("cpu")):
        if name == plan.buckets[0].specs[-1].name:
            order.append("bucket 0 taken")
            first_taken.set()
        got[name] = tensor.clone()
    t.join()
    assert order == ["bucket 0 taken", "rest sent"]
    assert all(torch.equal(got[n], sent[n]) for n in sent)
