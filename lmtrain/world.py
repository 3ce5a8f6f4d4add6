"""Who is training: one process, or one rank of an MPI job.

The world is made once, when `lmtrain fit` starts (as nanoGPT decides once
which process is the master).  A single process is a world of size 1, so the
training loop has one code path: it sums gradients with ``allreduce`` and
takes every decision with ``agree`` whatever the size, and with one process
those return what they were given.

Under ``mpiexec -n K`` (or a cluster's ``srun``) lmtrain finds the MPI world
itself through mpi4py: the launchers set environment variables (PMI_*,
OMPI_*, PMIX_*) that say a process was started as one of several.  The
engine is MPI's; nothing here moves bytes itself.
"""

import os
import sys

from lmtrain.errors import LmtrainError

# Set by the launchers of MPICH (Hydra), Intel MPI, Open MPI and Slurm (PMI-2 / PMIx).
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")
LAUNCHER_MARKERS = ("PMI_RANK", "PMI_FD", "PMI_PORT", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


class CollectiveError(LmtrainError):
    """An error every rank raises together (decided collectively): only rank 0 reports it."""


class World:
    """A world of one process: every collective returns its input."""

    rank, size, local_size = 0, 1, 1

    @property
    def is_main(self):
        """The one process that prints, shows progress and writes files."""
        return self.rank == 0

    def allreduce(self, buf):
        """Sum a float array over ranks, in place (one MPI Allreduce); returns it."""
        return buf

    def sum(self, values):
        """Element-wise sums of a few floats over ranks."""
        return [float(v) for v in values]

    def max(self, values):
        """Element-wise maxima of a few floats over ranks."""
        return [float(v) for v in values]

    def agree(self, *flags):
        """Each flag true on any rank is true on every rank: how ranks take decisions together."""
        return tuple(bool(v) for v in self.max([float(bool(f)) for f in flags]))

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable value)."""
        return obj

    def broadcast_array(self, buf):
        """Overwrite ``buf`` with rank 0's contents, in place."""
        return buf

    def gather(self, obj):
        """On rank 0, the list of every rank's ``obj``; None elsewhere."""
        return [obj]

    def barrier(self):
        pass

    def abort(self, code):
        sys.exit(code)

    def shard(self, n):
        """[start, stop) of this rank's contiguous block of ``n`` items (the blocks differ by at most one)."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def on_every_rank(self, fn):
        """Run ``fn`` on every rank; if it fails with an LmtrainError on any rank, raise it on all of them.

        For set-up steps (reading the corpus, preparing the run directory) that
        may fail on one rank only: the others would otherwise wait for it in
        the first collective.  The message is the lowest failing rank's.
        """
        try:
            result, error = fn(), None
        except LmtrainError as err:
            result, error = None, err
        errors = self.gather(None if error is None else (self.rank, str(error), error.exit_code))
        first = self.broadcast(next((e for e in errors if e is not None), None) if self.is_main else None)
        if first is not None:
            rank, message, code = first
            raise CollectiveError(message if rank == 0 else f"rank {rank}: {message}", exit_code=code)
        return result

    def on_main(self, fn):
        """Run ``fn`` on rank 0 only and give every rank its result; an LmtrainError is raised on all ranks."""
        if self.size == 1:
            return fn()
        return self.broadcast(self.on_every_rank(fn if self.is_main else (lambda: None)))

    def main_first(self, fn):
        """Run ``fn`` on rank 0, then on the other ranks (which find what rank 0 downloaded or cached);
        an LmtrainError on any rank is raised on all of them."""
        if self.size == 1:
            return fn()
        mine = self.on_every_rank(fn if self.is_main else (lambda: None))
        theirs = self.on_every_rank((lambda: None) if self.is_main else fn)
        return mine if self.is_main else theirs

    def describe(self):
        return "1 process"


class MPIWorld(World):
    """One rank of an MPI job (through mpi4py)."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        # ranks per host by name: MPI's shared-memory split says 1 when local transport is off
        hosts = comm.allgather(MPI.Get_processor_name())
        self.local_size, self.hosts = hosts.count(hosts[self.rank]), len(set(hosts))

    def allreduce(self, buf):
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def _reduce(self, values, op):
        import numpy as np

        buf = np.asarray(values, dtype=np.float64).copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=op)
        return buf.tolist()

    def sum(self, values):
        return self._reduce(values, self.MPI.SUM)

    def max(self, values):
        return self._reduce(values, self.MPI.MAX)

    def broadcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def broadcast_array(self, buf):
        self.comm.Bcast(buf, root=0)
        return buf

    def gather(self, obj):
        return self.comm.gather(obj, root=0)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def describe(self):
        return f"{self.size} MPI ranks on {self.hosts} host{'s' if self.hosts > 1 else ''}"


def launched_by_mpi():
    """The number of processes an MPI launcher started, or None when it did not start this one."""
    if not any(os.environ.get(k) for k in LAUNCHER_MARKERS):
        return None
    for var in LAUNCHER_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def supervise_rank(echo):
    """Under an MPI launcher, on Linux: do this rank's work in a child process, and report how it ended.

    When one rank dies (SIGKILL, the out-of-memory killer, a crash), MPI
    launchers end the whole job at once, the other ranks included, and
    MPICH's names only a process id.  The process the launcher started
    therefore waits for a child that does the work: it passes signals on
    (Ctrl-C to mpiexec reaches every rank this way), and if the child is
    killed it prints which rank died before the launcher stops the rest.  The
    child dies with its parent (PR_SET_PDEATHSIG), so nothing is left behind
    when the launcher kills the parent.  Returns in the child; the parent
    exits with the child's status.
    """
    size = launched_by_mpi()
    if not size or size < 2 or not sys.platform.startswith("linux") or os.environ.get("LMTRAIN_SUPERVISE") == "0":
        return
    import ctypes
    import signal
    import socket

    rank = next((os.environ[v] for v in LAUNCHER_RANK_VARS if os.environ.get(v, "").isdigit()), "?")
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(128 + signal.SIGKILL)
        # Launchers signal the process group they started; the parent passes each signal on exactly
        # once, so the child leaves that group (a second Ctrl-C would mean "quit at once").
        os.setpgid(0, 0)
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        echo(
            f"error: rank {rank} of {size} (pid {child} on {socket.gethostname()}) was killed by "
            f"{signal.Signals(sig).name}{' (out of memory?)' if sig == signal.SIGKILL else ''}; the launcher "
            f"stops the other ranks. The last checkpoint is intact: rerun the same command with --resume"
        )
        # Die of the same signal: MPICH's launcher ends the job when a rank is killed, but can take an exit
        # status of 128 + sig for a rank that chose to stop and leave the others blocked in a collective.
        sys.stderr.flush()
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


_world = None


def get_world():
    """This process's world, made on first use: MPI when a launcher started several processes."""
    global _world
    if _world is None:
        _world = _make_world()
    return _world


def current_world():
    """The world if one was made (for error reporting), else None."""
    return _world


def _make_world():
    size = launched_by_mpi()
    if size is None:
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        if size > 1:
            raise LmtrainError(
                f"started by an MPI launcher as one of {size} processes, but mpi4py is not "
                f"installed: pip install -e '.[mpi]' (or run lmtrain without mpiexec)"
            ) from None
        return World()
    comm = MPI.COMM_WORLD
    if size > 1 and comm.Get_size() == 1:
        # Each of the launcher's processes would train alone, all of them into one run directory.
        library = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
        raise LmtrainError(
            f"the launcher started {size} processes, but mpi4py sees a world of 1: mpi4py is "
            f"built against another MPI ({library}) than the one whose mpiexec started lmtrain; "
            f"use that MPI's mpiexec, or reinstall mpi4py against the launcher's MPI"
        )
    return MPIWorld(comm, MPI) if comm.Get_size() > 1 else World()


def threads_per_rank(world, configured=None):
    """BLAS and element-wise threads for each rank: ``configured``, else the cores this process may
    use divided among the ranks on its node (a launcher that pinned the rank has already divided them)."""
    if configured:
        return configured
    try:
        mine = len(os.sched_getaffinity(0))
    except AttributeError:
        mine = os.cpu_count() or 1
    if mine < (os.cpu_count() or mine):
        return mine
    return max(1, mine // world.local_size)
