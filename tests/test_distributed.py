"""The probe's collectives across two real processes (gloo), and their no-op form without a group."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mnn_callback.probing.distributed import all_gather_object, all_reduce, broadcast_object, world


def _worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        total = all_reduce(torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64))
        largest = all_reduce(torch.tensor([float(rank), -float(rank)]), op="max")
        gathered = all_gather_object({"rank": rank})
        broadcast = broadcast_object(f"from {rank}")
        torch.save(
            {"total": total, "largest": largest, "gathered": gathered, "broadcast": broadcast, "world": world()},
            f"{out_file}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_take_maxima_gather_and_broadcast(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        assert got["total"].tolist() == [3.0, 10.0]
        assert got["largest"].tolist() == [1.0, 0.0]
        assert got["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert got["broadcast"] == "from 0"
        assert got["world"] == (rank, 2)


def test_without_a_process_group_everything_is_local():
    value = torch.tensor([1.0, 2.0])
    assert all_reduce(value) is value
    assert all_gather_object(5) == [5]
    assert broadcast_object("x") == "x"
    assert world() == (0, 1)
