"""Data-parallel training on several processes: launch, rendezvous, collectives.

`cnnlab train ... --nproc N` starts N worker processes on this machine through PyTorch's
own launcher (`torch.distributed.run`, the machinery behind `torchrun`, with a c10d
rendezvous on a free 127.0.0.1 port); `torchrun --nnodes ... -m cnnlab.cli train ...`
starts them across machines. A worker finds its place from the usual environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the process group:
gloo on CPU, NCCL on CUDA. One process (WORLD_SIZE unset or 1) forms no group at all.

The split of the work (see also `cnnlab.engines.torch.backend`):
    every rank holds the whole data set and draws the same permutation per epoch; step s
    takes the global batch perm[s*B:(s+1)*B] and rank r its r-th contiguous piece of it
    (np.array_split: sizes differ by at most one, the first ranks take the larger ones).
    Each rank's mean loss is scaled by n_r * N / B, so DDP's average of the gradients,
    (1/N) sum_r grad(n_r N / B * mean_r) = grad(sum of losses / B), is the gradient of
    one process's mean loss over the global batch, also for an uneven last batch.
Metric sums are all-reduced, so the epoch line is one process's for the same batch.
"""
from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; the collectives the loop needs. For one
    process every method is the identity and nothing touches torch.distributed."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (the Ctrl-C agreement)."""
        if self.size == 1:
            return bool(flag)
        import torch
        import torch.distributed as dist
        t = torch.tensor([int(bool(flag))], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a picklable value such as the epoch's logs)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=_collective_device())
        return box[0]


SINGLE = World()


def _collective_device():
    import torch
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current() -> World:
    """The world of this process: SINGLE unless a process group is initialized."""
    if "torch.distributed" not in sys.modules:  # the NumPy engine never imports torch
        return SINGLE
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(),
                 int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def env_world_size() -> int:
    """WORLD_SIZE as a launcher set it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str | None = "auto") -> World:
    """Join the process group the environment describes (a worker of torchrun or --nproc):
    NCCL when this rank trains on CUDA, else gloo. Ranks other than 0 print nothing on
    stdout from here on. A single process forms no group and gets SINGLE."""
    if env_world_size() <= 1:
        return SINGLE
    import torch
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in (None, "auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    world = current()
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")
    return world


def shutdown(clean: bool = True):
    """Leave the process group; after a clean end all ranks leave together (a barrier),
    so that none closes its connections while another still reads from them."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def exit_worker(code: int):
    """End a worker process that has left its process group: flush and exit without the
    C++ teardown, where a communication thread still held at exit can abort the process
    ("terminate called without an active exception", seen about once in 12 runs)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_peer_loss(exc: BaseException) -> bool:
    """Whether `exc` says another rank went away during a collective."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        w in text for w in ("Connection closed", "Connection reset", "Broken pipe", "gloo",
                            "NCCL", "Socket Timeout"))


def default_threads(nproc: int) -> int:
    """Threads per rank: the cores shared out among the ranks of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(nproc, 1))


# launching ---------------------------------------------------------------------------
class LaunchFailed(Exception):
    """A worker ended badly; the message names it (no traceback for the console)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _quiet_elastic():
    """torch.distributed.elastic logs warnings and a summary of every failure; cnnlab
    reports those itself in one line."""
    os.environ.setdefault("LOGLEVEL", "ERROR")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(nproc: int, worker_argv: list[str], monitor_interval: float = 0.1) -> int:
    """Run `python -m cnnlab.cli *worker_argv` in `nproc` processes on this machine through
    torch.distributed.run (standalone rendezvous, no restarts) and wait for them.

    Returns 0, or 130 after Ctrl-C (forwarded once to the workers, which stop together
    after the current step and save a checkpoint). Raises LaunchFailed when a worker
    died or failed: the launcher then stops the others (SIGTERM, then SIGKILL)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(default_threads(nproc)))
    _quiet_elastic()
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    _quiet_elastic()
    if os.path.exists("/sys/class/net/lo"):   # one machine: ranks talk over loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args = get_args_parser().parse_args(
        ["--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
         f"--rdzv-id={uuid.uuid4()}", f"--nproc-per-node={nproc}", "--max-restarts=0",
         f"--monitor-interval={monitor_interval}", "-m", "cnnlab.cli", *worker_argv])
    try:
        run(args)
    except SignalException:
        return 130
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        codes = {f.exitcode for _, f in failures}
        if codes <= {1, 130}:       # the workers said what went wrong themselves
            raise LaunchFailed("", max(codes)) from None
        # name the cause: a rank killed by a signal (the launcher ends the others with
        # SIGTERM, and a rank that lost its peer exits with 1), else an unusual exit code
        def cause(item):
            f = item[1]
            return (0 if f.exitcode < 0 and f.signal_name() != "SIGTERM" else
                    1 if f.exitcode not in (1, 130, -15) else 2)
        rank, f = min(failures, key=cause)
        what = (f"was killed by {f.signal_name()}" if f.exitcode < 0
                else f"exited with code {f.exitcode}")
        raise LaunchFailed(f"rank {rank} (pid {f.pid}) {what}; all ranks stopped", 1) from None
    except Exception as e:   # rendezvous or start-up of the workers
        raise LaunchFailed(f"the launcher failed: {type(e).__name__}: {e}", 1) from None
    return 0
