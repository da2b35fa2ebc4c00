"""One job on several devices of this host, data-parallel (worker/distributed.py).

The worker's process stays the controller, as on one device: it holds the claim, the lease and its
heartbeat, and makes every database and artifact-store write. It starts one process per rank
(spawned, with torchrun's environment), and each rank runs the recipe (worker/pipeline.py) on its
device. Rank 0's hooks are calls over a pipe that the controller answers with the job's own hooks
(events, the resolved hyperparameters, checkpoints, whose files come over the pipe; the adapter
comes with the result). The other ranks' hooks do nothing but take rank 0's answer to `control`,
so that every rank pauses, stops or goes on at the same step.

A rank that dies or fails ends the attempt: the controller kills the other ranks and raises, an
InfraError (the job is retried and resumes from its last checkpoint) unless the rank raised a
UserError (bad data: the job fails, as on one device). Ranks ignore SIGINT and SIGTERM, which
reach the controller and become a checkpoint and a clean stop, and die with the controller.
"""

import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from worker import distributed, pipeline
from worker.errors import InfraError, UserError
from worker.hooks import Control, ResidentBase, TrainingHooks, TrainResult

log = logging.getLogger("tuneforge.worker")

# The calls rank 0 makes to the controller, beyond save_checkpoint (whose `write` cannot travel).
HOOK_CALLS = {"control", "log", "record_hyperparameters"}
# How long ranks that are done get to leave the process group before they are killed.
EXIT_GRACE_SECONDS = 30
PR_SET_PDEATHSIG = 1


def training_devices(worker_gpus: str | None, device: str) -> list[int] | None:
    """The device indices one job trains on (TUNEFORGE_WORKER_GPUS); None: the default device."""
    if worker_gpus is None:
        return None
    if worker_gpus == "all":
        return list(range(torch.cuda.device_count())) if device == "cuda" else None
    return [int(index) for index in worker_gpus.split(",")]


def train(
    job: pipeline.JobConfig,
    hooks: TrainingHooks,
    resident: ResidentBase,
    resume_from: Path | None,
    worker_gpus: str | None,
) -> TrainResult:
    """`pipeline.train` in this process on one device (the worker's resident base), or on ranks."""
    devices = training_devices(worker_gpus, job.device)
    if devices and job.device == "cuda" and max(devices) >= torch.cuda.device_count():
        raise InfraError(
            f"TUNEFORGE_WORKER_GPUS={worker_gpus} names GPU {max(devices)}, but this worker sees "
            f"{torch.cuda.device_count()} (indices count from 0, within CUDA_VISIBLE_DEVICES)"
        )
    if devices is not None and len(devices) > 1:
        return train_on_ranks(job, hooks, devices, resume_from)
    if devices and job.device == "cuda":
        torch.cuda.set_device(devices[0])
    return pipeline.train(job, hooks, resident, resume_from)


# ---------------------------------------------------------------- the controller


def train_on_ranks(
    job: pipeline.JobConfig, hooks: TrainingHooks, devices: list[int], resume_from: Path | None
) -> TrainResult:
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    port, world = _free_port(), len(devices)
    pipes: list[Connection] = []
    processes = []
    finished = False
    try:
        for rank, gpu in enumerate(devices):
            ours, theirs = context.Pipe()
            spec = RankSpec(rank, world, port, gpu, os.getpid())
            process = context.Process(
                target=run_rank,
                args=(spec, job, resume_from, hooks.claimed_at, theirs),
                name=f"tuneforge-rank-{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            pipes.append(ours)
            processes.append(process)
        log.info("training on %d ranks (%s %s)", world, job.device, ",".join(map(str, devices)))
        result = _serve(hooks, pipes, processes)
        finished = True
        return result
    finally:
        for process in processes:
            if finished:  # the others leave the process group and exit by themselves
                process.join(EXIT_GRACE_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in pipes:
            pipe.close()


def _serve(hooks: TrainingHooks, pipes: list[Connection], processes) -> TrainResult:
    """Answer rank 0's hook calls until it sends its result; raise when any rank fails."""
    running = set(range(len(processes)))
    while True:
        rank, (kind, *args) = _receive(pipes, processes, running)
        if kind == "result":
            outcome, step, trained_tokens, adapter = args
            return TrainResult(outcome, step, trained_tokens, functools.partial(write_files, files=adapter))
        if kind == "user_error":
            raise UserError(*args)
        if kind == "error":  # a rank that died is the cause of the others' errors
            dead = [_ended(r, processes) for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
            raise InfraError("; ".join([*dead, f"rank {rank} of {len(processes)} failed: {args[0]}"]))
        if kind == "save_checkpoint":
            step, files, metrics = args
            write = functools.partial(write_files, files=files)
            pipes[rank].send(hooks.save_checkpoint(step, write, metrics))
        elif kind in HOOK_CALLS:
            pipes[rank].send(getattr(hooks, kind)(*args))
        else:
            raise InfraError(f"rank {rank} sent an unknown message {kind!r}")


def _receive(pipes: list[Connection], processes, running: set[int]) -> tuple[int, tuple]:
    """The next message of a rank in `running`. A rank that exits with 0 has finished training and
    leaves `running`; one that exits otherwise, with nothing more to say, has failed."""
    while running:
        ready = wait([pipes[r] for r in running] + [processes[r].sentinel for r in running])
        for rank in sorted(running):
            if pipes[rank] in ready:
                try:
                    return rank, pipes[rank].recv()
                except EOFError:  # it closed its end: it is exiting
                    pass
            if pipes[rank] in ready or processes[rank].sentinel in ready:
                processes[rank].join(EXIT_GRACE_SECONDS)
                if processes[rank].exitcode != 0:
                    raise InfraError(_ended(rank, processes))
                running.discard(rank)
    raise InfraError("every rank exited without rank 0's result")


def _ended(rank: int, processes) -> str:
    process = processes[rank]
    if process.exitcode is None:
        how = "closed its pipe and did not exit"
    elif process.exitcode < 0:
        how = f"was killed by {signal.Signals(-process.exitcode).name}"
    else:
        how = f"exited with code {process.exitcode}"
    return f"rank {rank} of {len(processes)} (pid {process.pid}) {how}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_files(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


# ---------------------------------------------------------------- a rank


@dataclass(frozen=True)
class RankSpec:
    rank: int
    world: int
    port: int
    gpu: int
    controller_pid: int


class RankHooks:
    """TrainingHooks of a rank: rank 0 (with a pipe) asks the controller, the others keep quiet;
    every rank takes rank 0's answer to `control`."""

    def __init__(self, pipe: Connection | None, data_parallel: distributed.DataParallel, claimed_at: float):
        self.pipe, self.data_parallel = pipe, data_parallel
        # time.monotonic() is the host's clock: the controller's claim time holds here too.
        self.claimed_at = claimed_at

    def _ask(self, *call):
        if self.pipe is None:
            return None
        self.pipe.send(call)
        return self.pipe.recv()

    def control(self) -> Control:
        return self.data_parallel.from_rank_0(self._ask("control"))

    def log(self, message: str, data: dict) -> None:
        self._ask("log", message, data)

    def record_hyperparameters(self, hyperparameters: dict, message: str, data: dict) -> None:
        self._ask("record_hyperparameters", hyperparameters, message, data)

    def save_checkpoint(self, step: int, write, metrics: dict) -> None:
        if self.pipe is not None:
            self._ask("save_checkpoint", step, _written(write), metrics)


def _written(write) -> dict[str, bytes]:
    """The files `write` puts in a directory."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-rank-") as directory:
        write(Path(directory))
        return read_files(Path(directory))


def run_rank(
    spec: RankSpec,
    job: pipeline.JobConfig,
    resume_from: Path | None,
    claimed_at: float,
    pipe: Connection,
) -> None:
    """A rank's process: join the job's process group, train, and (rank 0) send the result."""
    _die_with(spec.controller_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {spec.rank}: %(message)s")
    os.environ.update(
        RANK=str(spec.rank),
        LOCAL_RANK=str(spec.rank),
        WORLD_SIZE=str(spec.world),
        LOCAL_WORLD_SIZE=str(spec.world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(spec.port),
    )
    if job.device != "cuda":  # the CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    try:
        data_parallel = distributed.join(job.device, spec.gpu)
        hooks = RankHooks(pipe if spec.rank == 0 else None, data_parallel, claimed_at)
        result = pipeline.train(job, hooks, ResidentBase(), resume_from)
        if spec.rank == 0:
            adapter = _written(result.save_adapter)
            pipe.send(("result", result.outcome, result.step, result.trained_tokens, adapter))
    except UserError as exc:
        pipe.send(("user_error", exc.code, exc.message, exc.param))
        sys.exit(1)
    except Exception as exc:
        log.exception("rank %d of %d failed", spec.rank, spec.world)
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    finally:
        distributed.leave()


def _die_with(controller_pid: int) -> None:
    """Have the kernel kill this process when the controller dies (Linux), so that no rank trains
    on, or holds a GPU, for a worker that is gone."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != controller_pid:  # it died before prctl
        os._exit(1)
