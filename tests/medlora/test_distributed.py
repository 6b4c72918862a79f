"""medlora/distributed.py without processes: the shard of a step, one process as a no-op world, and
the per-rank RNG files of a checkpoint. The multi-process checks are in tests/test_distributed_training.py."""

import random
from dataclasses import dataclass

import pytest
import torch

from data import epoch_steps, micro_batches
from lora import inject_lora, lora_parameters
from medlora.checkpoint import TrainState, load_checkpoint, rng_file_bytes, rng_state, save_checkpoint, verify_checkpoint
from medlora.config import TrainConfig, resumed_config
from medlora.distributed import SINGLE_PROCESS, World, backend_reason, shard_micro_batches
from tests.conftest import make_tiny_model


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("max_tokens", [None, 300])
def test_shards_are_disjoint_cover_the_epoch_and_have_equal_length(world_size, max_tokens):
    lengths = [random.Random(i).randint(20, 160) for i in range(103)]
    seen = []
    for step in epoch_steps(lengths, step_examples=10, seed=3, epoch=0):
        batches = micro_batches(step, lengths, batch_size=3, max_tokens=max_tokens)
        shards = [shard_micro_batches(batches, rank, world_size) for rank in range(world_size)]
        assert len({len(shard) for shard in shards}) == 1  # every rank runs as many micro-batches
        assert len(shards[0]) == -(-len(batches) // world_size)
        rows = [row for shard in shards for batch in shard for row in batch]
        assert sorted(rows) == sorted(step)  # together the shards are the step, no row twice
        seen += rows
    assert sorted(seen) == list(range(len(lengths)))  # every row of the epoch, once


def test_a_rank_short_of_a_micro_batch_gets_an_empty_one():
    assert shard_micro_batches([[1, 2], [3], [4]], 0, 2) == [[1, 2], [4]]
    assert shard_micro_batches([[1, 2], [3], [4]], 1, 2) == [[3], []]
    assert shard_micro_batches([[5]], 2, 3) == [[]]
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        shard_micro_batches([[1]], 2, 2)


def test_one_process_is_a_world_that_sends_nothing():
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.full((3,), 2.0)
    SINGLE_PROCESS.sum_gradients(params)
    assert torch.equal(params[0].grad, torch.full((3,), 2.0))
    assert SINGLE_PROCESS.sum(1.5, 7) == (1.5, 7)
    assert SINGLE_PROCESS.shard([[1], [2]]) == [[1], [2]]
    assert World(rank=1, world_size=2).shard([[1, 2], [3], [4]]) == [[3]]  # the empty padding computes nothing
    assert SINGLE_PROCESS.gather_bytes(b"x") == [b"x"] and SINGLE_PROCESS.text_from_main("a") == "a"
    assert SINGLE_PROCESS.is_main and SINGLE_PROCESS.describe() == "1 process (no torchrun)"


def test_backend_errors_are_cut_to_their_gist():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:8358: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")
    assert backend_reason(gloo) == "Read error [127.0.0.1]:8358: Connection reset by peer"
    assert backend_reason(RuntimeError("")) == "RuntimeError"


@dataclass(frozen=True)
class OneOfTwoRanks(World):
    """A rank of two, with rank 1's RNG state handed in instead of gathered over a process group."""

    rank_one_rng: bytes = b""

    def gather_bytes(self, payload):
        return [payload, self.rank_one_rng]


def test_a_checkpoint_holds_every_ranks_rng_state(tmp_path):
    torch.manual_seed(11)
    rank_one_state = torch.get_rng_state()
    rank_one_rng = rng_file_bytes(rng_state())
    torch.manual_seed(5)
    rank_zero_state = torch.get_rng_state()
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    config = TrainConfig(output_dir=str(tmp_path), world_size=2)
    torch.set_rng_state(rank_zero_state)
    folder = save_checkpoint(tmp_path, model, optimizer, scaler, TrainState(step=2), config, "base",
                             world=OneOfTwoRanks(rank=0, world_size=2, rank_one_rng=rank_one_rng))
    assert (folder / "rng-rank1.safetensors").is_file() and verify_checkpoint(folder) is None
    torch.rand(4)
    load_checkpoint(folder, model, optimizer, scaler, rank=1)
    assert torch.equal(torch.get_rng_state(), rank_one_state)
    load_checkpoint(folder, model, optimizer, scaler, rank=0)
    assert torch.equal(torch.get_rng_state(), rank_zero_state)
    assert save_checkpoint(tmp_path, model, optimizer, scaler, TrainState(step=4), config, "base",
                           world=OneOfTwoRanks(rank=1, world_size=2)) is None  # only rank 0 writes
    assert not (tmp_path / "checkpoints" / "step-000004").exists()


def test_resuming_with_another_number_of_ranks_is_refused():
    saved, requested = TrainConfig(world_size=2), TrainConfig(world_size=1)
    with pytest.raises(ValueError, match=r"^src: the run was trained by 2 rank\(s\) and this job has 1; resume it with the same "
                                         r"number \(torchrun --nproc_per_node 2 \.\.\., or python train.py for 1\)"):
        resumed_config(saved, requested, set(), "src")
    assert resumed_config(saved, TrainConfig(world_size=2, dist_timeout=5.0), {"dist_timeout"}, "src").dist_timeout == 5.0
