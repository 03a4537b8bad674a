"""The multi-process harness of the distributed tests (imported by them as ``dist_harness``).

``run_workers`` starts ``world`` processes (forked from the server of ``preloaded``, which has
torch and the product imported: a spawned process would import them again) that each
run ``target(rank, world, *args)`` and save its return value to ``outdir/rank{rank}.pt``; the
parent joins them with a timeout, kills stragglers, fails the test with the children's
tracebacks (written to ``outdir/error{rank}.txt``) and returns the per-rank results.

``target`` must be a module-level function (the children import it by name).
"""
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from preloaded import CONTEXT

JOB_TIMEOUT_S = 120


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank, world, port, timeout_s=60):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def rank_rows(sizes, rank):
    """The slice of the full batch that ``rank`` holds when rank r holds ``sizes[r]`` rows."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _child(rank, target, world, port, outdir, init, args):
    try:
        if init == "gloo":
            init_gloo(rank, world, port)
        else:  # "env": the code under test initialises the process group from torchrun's variables
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.save(target(rank, world, *args), os.path.join(outdir, f"rank{rank}.pt"))
        if init == "gloo":
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(outdir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_workers(target, world, outdir, *args, init="gloo", timeout=JOB_TIMEOUT_S, weights_only=False):
    """Run ``target(rank, world, *args)`` on ``world`` new processes; return their results by rank.

    ``init="gloo"``: each child joins a gloo group (TCP rendezvous on a free port) before
    ``target`` and leaves it (barrier, destroy) after saving the result.  ``init="env"``: each
    child only gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment.
    """
    if init not in ("gloo", "env"):
        raise ValueError(f"init must be 'gloo' or 'env', not {init!r}")
    outdir = Path(outdir)
    port = free_port()
    procs = [CONTEXT.Process(target=_child, args=(r, target, world, port, str(outdir), init, args))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    errors = "\n".join(f.read_text() for f in sorted(outdir.glob("error*.txt")))
    assert not hung, f"{len(hung)} of {world} ranks hung past {timeout}s\n{errors}"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"exit codes {codes}\n{errors}"
    return [torch.load(outdir / f"rank{r}.pt", weights_only=weights_only) for r in range(world)]
