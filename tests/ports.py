"""For the tests that start a server or a process group: a free port, and 2-process gloo runs."""
import os
import socket
import sys
import warnings


def free_port():
    """A port nothing listens on now (the OS picks it; a later bind may still race for it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, args, nprocs=2):
    """mp.spawn(worker, (port,) + args) on a fresh port, every worker ending in `leave()`.

    One retry, with a warning, when a worker process died by a signal: once in a CI run a gloo
    worker of test_nan_origin aborted in C++ ('terminate called without an active exception',
    SIGABRT: a std::thread destroyed unjoined, not a Python error), and 200 runs here did not
    bring it back. Also one retry when the port was taken between free_port() and the bind. A failed
    assertion, any other Python exception or a second failure fails as usual."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

    try:
        mp.spawn(worker, args=(free_port(),) + tuple(args), nprocs=nprocs, join=True)
    except (ProcessExitedException, ProcessRaisedException) as e:
        died = getattr(e, "signal_name", None)  # (exited with a code: not the gloo abort)
        taken = "address already in use" in str(e).lower()  # the port was taken since free_port
        if not (died or taken):
            raise
        warnings.warn(f"{'a gloo worker died by ' + died if died else 'the port was taken'}; running the processes again")
        mp.spawn(worker, args=(free_port(),) + tuple(args), nprocs=nprocs, join=True)


def leave():
    """The end of a spawned worker, after it saved its results: wait for every rank, destroy the
    process group, and exit without the interpreter's finalization (gloo's threads outliving it
    are a known way for a finished worker to abort; see torch PR 179291)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
