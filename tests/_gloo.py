"""One rank of a multi-process gloo test: the process group, the error file and the clean-up every worker needs.

Workers run under ``torch.multiprocessing`` spawn with a ``file://`` rendezvous; a timeout on the group makes a bug
fail instead of hang. If the body raises, the traceback is written to ``error{rank}.txt`` in ``out_dir`` (the test
reads it to say what went wrong on which rank) and the exception propagates.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import traceback
from collections.abc import Iterator

import torch
import torch.distributed as dist


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, init_file: str, out_dir: str, timeout_s: float = 60) -> Iterator[None]:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
