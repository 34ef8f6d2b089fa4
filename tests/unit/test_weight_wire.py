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
    pack_bucket,
    plan_buckets,
    receive_buckets,
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
