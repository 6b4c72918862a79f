"""Several training processes as one: torchrun's ranks, their process group, and the few collectives train.py needs.

    torchrun --nproc_per_node 2 train.py ...        # two ranks on one machine (gloo on CPU, nccl on CUDA)
    python train.py ...                             # one process: World(), no process group, nothing sent

    world = start_ranks(device, timeout_s=600.0)    # reads torchrun's WORLD_SIZE, RANK, LOCAL_RANK
    mine = world.shard(micro_batches)               # the micro-batches of the step this rank computes
    nll_sum, tokens = world.sum(nll_sum, tokens)    # all-reduced sums (floats)
    world.sum_gradients(params)                     # one all-reduce of the LoRA gradients per optimizer step

Why a hand-written all-reduce and not DistributedDataParallel: the loss (medlora/loss.py) calls the
model's trunk and its lm_head separately, so DDP's forward wrapper, which arms its gradient hooks,
would never run; the trainable parameters are only the LoRA matrices (megabytes), so one flat
all-reduce per step costs little and there is nothing to overlap; and because it runs once per
step, after the last micro-batch, no rank syncs on its other micro-batches (what DDP's no_sync
does) and ranks need not even hold the same number of micro-batches. Each rank divides its NLL
by the step's global target-token count and the all-reduce SUMS the gradients, so N ranks get the
gradient one process gets from the same global step, with no 1/N rescaling.

Failures: every collective has the process group's timeout (--dist-timeout). A peer that dies
closes its sockets and the others fail at once (gloo: "Connection reset by peer"); one that hangs
makes them fail when the timeout runs out. Either way the collective's error becomes a
`TrainingStopped` with one clear line (`RankFailure`), and `leave()` ends the process at once:
measured, a gloo rank whose peer still hangs otherwise waits in Python's exit (the process group's
destructor) until that peer ends. torchrun then stops the remaining ranks.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator, NoReturn, Sequence

import torch
import torch.distributed as dist

from medlora.errors import EXIT_RANK_FAILED, TrainingStopped


class RankFailure(TrainingStopped):
    """Another rank died, raised, or stopped answering; this rank stops too."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_RANK_FAILED)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of the job. The default is one process alone."""

    rank: int = 0  # this process, 0 .. world_size - 1 (rank 0 writes the run folder)
    world_size: int = 1  # processes training together
    local_rank: int = 0  # this process on its machine (its GPU under nccl)
    backend: str | None = None  # "gloo" or "nccl"; None for one process without a process group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank computes

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    def describe(self) -> str:
        """The start-up line's account of the ranks."""
        if self.backend is None:
            return "1 process (no torchrun)"
        return f"{self.world_size} ranks, backend {self.backend}, this is rank {self.rank} on {self.device}"

    def shard(self, batches: Sequence[list[int]]) -> list[list[int]]:
        """The micro-batches this rank computes: its shard_micro_batches() without the empty padding."""
        return [rows for rows in shard_micro_batches(batches, self.rank, self.world_size) if rows]

    def sum(self, *values: float) -> tuple[float, ...]:
        """Each value summed over the ranks (float64), the same on every rank."""
        if self.world_size == 1:
            return values
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        with collective(self, "summing the step's loss and token counts"):
            dist.all_reduce(totals)
        return tuple(totals.tolist())

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its sum over the ranks: one all-reduce of one flat buffer.

        A parameter with no gradient on this rank (no micro-batch this step) counts as zeros.
        """
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numel]
        with collective(self, "the all-reduce of the LoRA gradients"):
            dist.all_reduce(flat)
        for param, chunk in zip(params, flat.split([g.numel() for g in grads])):
            param.grad = chunk.view_as(param)

    def copy_from_main(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Overwrite `params` with rank 0's values, so every rank starts from the same adapter."""
        if self.world_size == 1:
            return
        with collective(self, "copying rank 0's adapter to every rank"), torch.no_grad():
            for param in params:
                dist.broadcast(param.data, src=0)

    def text_from_main(self, text: str) -> str:
        """Rank 0's `text`, on every rank."""
        if self.world_size == 1:
            return text
        payload = torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.device)
        size = torch.tensor([payload.numel()], device=self.device)
        with collective(self, "receiving the run folder's state from rank 0"):
            dist.broadcast(size, src=0)
            buffer = payload if self.is_main else torch.empty(int(size), dtype=torch.uint8, device=self.device)
            dist.broadcast(buffer, src=0)
        return bytes(buffer.cpu().tolist()).decode()

    def gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every rank's `payload`, in rank order, on every rank (used to bring every RNG state to rank 0)."""
        if self.world_size == 1:
            return [payload]
        size = torch.tensor([len(payload)], device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        with collective(self, "gathering every rank's RNG state"):
            dist.all_gather(sizes, size)
            longest = max(int(s) for s in sizes)
            mine = torch.zeros(longest, dtype=torch.uint8, device=self.device)
            mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(gathered, mine)
        return [bytes(buffer[: int(s)].cpu().numpy().tobytes()) for buffer, s in zip(gathered, sizes)]

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            with collective(self, what):
                dist.barrier()

    @contextmanager
    def main_first(self, what: str) -> Iterator[None]:
        """Rank 0 runs the block first, the others after it (e.g. a cache only rank 0 should build)."""
        if not self.is_main:
            self.barrier(what)
        yield
        if self.is_main:
            self.barrier(what)

    @contextmanager
    def printing_on_main(self) -> Iterator[None]:
        """Rank 0 prints; the others' standard output goes nowhere (their errors still reach stderr)."""
        if self.is_main:
            yield
            return
        with open(os.devnull, "w") as sink, redirect_stdout(sink):
            yield

    def seed_per_rank(self, seed: int) -> None:
        """Give each rank but 0 its own torch RNG stream, so no two ranks draw the same dropout masks.

        Rank 0 keeps the stream one process has; the LoRA init is drawn before this, the same on all.
        """
        if self.rank > 0:
            torch.manual_seed(seed * 1_000_003 + self.rank)

    def end(self) -> None:
        """After a run that ended well on every rank: wait for the others, then close the process group."""
        if self.world_size > 1:
            self.barrier("finishing")
            dist.destroy_process_group()


SINGLE_PROCESS = World()


def shard_micro_batches(batches: Sequence[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Rank `rank`'s share of a step's micro-batches: every world_size-th one, starting at `rank`.

    Every rank cuts the same global step into the same micro-batches, so the shards are disjoint
    and together hold every row. Each shard has ceil(len(batches) / world_size) micro-batches; a
    rank short of one gets an empty micro-batch ([]), which computes nothing (World.shard drops it:
    what every rank must join is the one all-reduce per step, not a number of micro-batches). With
    token-budget batching the micro-batches carry about the same padded tokens, so ranks get
    similar work.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    per_rank = -(-len(batches) // world_size)
    mine = list(batches[rank::world_size])
    return mine + [[] for _ in range(per_rank - len(mine))]


def start_ranks(device: torch.device, timeout_s: float) -> World:
    """This process's World: alone without torchrun, else a member of torchrun's process group.

    `timeout_s` bounds every collective: a rank waits no longer for the others (--dist-timeout).

    Reads torchrun's WORLD_SIZE, RANK and LOCAL_RANK (and, inside init_process_group, MASTER_ADDR
    and MASTER_PORT). On CUDA each rank takes GPU LOCAL_RANK and the backend is nccl; on CPU gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(device=device)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    world = World(rank, world_size, local_rank, backend, device)
    with collective(world, "joining the other ranks (init_process_group)"):
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return world


@contextmanager
def collective(world: World, what: str) -> Iterator[None]:
    """Turn a failed collective (a peer died, raised, or passed the timeout) into a one-line RankFailure."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed's DistBackendError, DistNetworkError, ... are RuntimeErrors
        raise RankFailure(
            f"rank {world.rank} of {world.world_size}: another rank died or stopped answering during {what} "
            f"({backend_reason(error)}); checkpoints already written are kept: rerun the same torchrun command "
            f"with --resume auto"
        ) from None


def backend_reason(error: BaseException) -> str:
    """The gist of a backend error: '[.../pair.cc:537] Read error ...: Connection reset by peer. This is ...' -> 'Read error ...: Connection reset by peer'."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0]


def leave(exit_code: int) -> NoReturn:
    """End this rank now with `exit_code`, skipping the process group's teardown (it can wait on a hung peer)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
