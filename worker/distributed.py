"""Data parallelism for the recipe: one job over several processes of one host, each joined to the
process group that torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
worker/ranks.py sets the same for the worker's own ranks). NCCL on GPUs, gloo on CPU.

Every rank holds the whole model (the 4-bit base and the LoRA) and the whole data set. A step's
examples are split between the ranks by tokens (`shard`, computed alike on every rank); each rank
sums the loss over its share's targets and divides by the whole step's target count, so once the
gradients are summed over the ranks (`sum_gradients`) every rank holds the gradient one process
would have computed, clips it alike and takes the same optimizer step. Without a process group
there is one rank: `shard` keeps everything and the sums change nothing.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from worker.data import Example

# How long a collective waits for a rank that does not come to it. A rank that dies is seen at
# once by the worker (worker/ranks.py), which ends the others; this bounds a rank that hangs
# without dying. The longest legitimate wait is rank 0 saving a checkpoint while the others wait
# for the next step, which takes seconds.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "DataParallel":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def shard(self, examples: list[Example]) -> list[Example]:
        """This rank's share of a step: longest first, each example to the rank with the fewest
        tokens so far (the lowest on a tie), kept in the step's order."""
        if self.world == 1:
            return examples
        tokens = [0] * self.world
        mine = []
        for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids)):
            rank = tokens.index(min(tokens))
            tokens[rank] += len(examples[i].input_ids)
            if rank == self.rank:
                mine.append(i)
        return [examples[i] for i in sorted(mine)]

    def sum_gradients(self, parameters: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum the parameters' gradients and the step's loss over the ranks, in one all-reduce (a
        rank without a share of the step adds zeros). Returns the summed loss."""
        if self.world == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat)
        offset = 0
        for parameter in parameters:
            parameter.grad = flat[offset : offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
        return flat[-1].clone()  # not a view that would keep the whole buffer alive

    def sum_values(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        summed = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        return summed.tolist()

    def from_rank_0(self, value):
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def join(device: str, gpu: int | None = None) -> DataParallel:
    """Join the process group of the environment: NCCL on `gpu` (LOCAL_RANK's by default), or gloo
    on the CPU."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) if gpu is None else gpu)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return DataParallel.current()


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
