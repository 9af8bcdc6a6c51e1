"""Data-parallel evaluation: which samples a process answers when ``torchrun`` / ``accelerate launch`` starts
several, and the few collective calls the runner needs (``torch.distributed``, gloo backend).

A launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``) in each
process's environment; :func:`shard_from_env` reads them. Sample ``i`` of each data set (its canonical order)
belongs to rank ``i % WORLD_SIZE``; a process with no launcher is rank 0 of 1 and owns every sample.
The ranks only meet at barriers and to exchange their outcome, small objects that gloo carries over the CPU
on any machine, so the group is gloo also where the models run on GPUs (:func:`rank_device` gives each
rank its ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator, Mapping
from typing import Any

GROUP_TIMEOUT = datetime.timedelta(hours=24)
"""How long a rank waits at a barrier for the others (a finished rank waits for the slowest one; torchrun
ends every rank when one dies, so the wait is bounded by the run, not by this)."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel run: rank ``rank`` of ``world_size`` processes, on the machine's
    GPU ``local_rank``. ``Shard()`` is the one process of an ordinary run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"rank {self.rank} of world size {self.world_size} (local rank {self.local_rank}): "
                             "need world size >= 1, 0 <= rank < world size and local rank >= 0")

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that merges, writes the tables and prints)."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether sample ``index`` (its position in its data set's canonical order) is this rank's."""
        return index % self.world_size == self.rank

    def barrier(self) -> None:
        """Wait until every rank is here (nothing to wait for in a one-process run)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard:
    """This process's :class:`Shard` from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as torchrun and
    ``accelerate launch`` set them; absent: rank 0 of 1; ``LOCAL_RANK`` defaults to ``RANK``).

    Raises:
        ValueError: a variable that is not an int, a rank outside [0, WORLD_SIZE), or several processes
            without ``MASTER_ADDR`` / ``MASTER_PORT`` (naming what is missing and how to launch).
    """
    env = os.environ if environ is None else environ
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0")):
        try:
            values[name] = int(env.get(name, default))
        except ValueError:
            raise ValueError(f"environment variable {name}={env.get(name)!r} is not an int") from None
    try:
        local = int(env.get("LOCAL_RANK", str(values["RANK"])))
    except ValueError:
        raise ValueError(f"environment variable LOCAL_RANK={env.get('LOCAL_RANK')!r} is not an int") from None
    shard = Shard(values["RANK"], values["WORLD_SIZE"], local)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if shard.world_size > 1 and not env.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={shard.world_size} but {' and '.join(missing)} not set: start the processes "
                         "with torchrun --nproc_per_node N (or accelerate launch), which sets them")
    return shard


def rank_device(shard: Shard, device: str) -> str:
    """The device of this rank's model: ``cuda:LOCAL_RANK`` for ``device`` ``"cuda"`` in a run of several
    processes, ``device`` unchanged otherwise (``"cpu"``, or any device in a one-process run).

    Raises:
        ValueError: several processes and ``device`` names one GPU (``cuda:3``): every rank would load
            its model there.
    """
    if shard.world_size == 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ValueError(f"--device {device} names one GPU for {shard.world_size} processes; pass --device cuda "
                         "(or none): each process takes cuda:LOCAL_RANK")
    return f"cuda:{shard.local_rank}"


@contextlib.contextmanager
def process_group(shard: Shard) -> Iterator[None]:
    """Join the ranks in a gloo process group for the block (nothing in a one-process run; a group that
    already exists, e.g. one ``accelerate`` made, is used as it is and left open)."""
    if shard.world_size == 1:
        yield
        return
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", rank=shard.rank, world_size=shard.world_size, timeout=GROUP_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()
