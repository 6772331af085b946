"""One rank of the distributed-calibration test (spawned by tests/test_criteria.py)."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))


def calib_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 32, 32, generator=g) for _ in range(4)]


def make_plan(calib):
    import models
    import amgfx
    torch.manual_seed(0)
    m, args, kwargs = models.vit()
    return amgfx.plan_for(m, args, kwargs, method="snp+amg", target_flops=0.6, calib=calib, kinds=("qk", "v", "head", "mlp"),
                          progress=False)


def rank_main(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        plan = make_plan(calib_batches()[rank::world])
        plan.save(os.path.join(out, f"rank{rank}.json"))
    finally:
        dist.destroy_process_group()


STREAM_CONFIG = dict(method="snp", target_flops=0.6, scope="blocks")


def stream_windows():
    """Four [2, 16] token windows: two per rank, so each rank's refit folds are the single process's halves."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 60, (2, 16), generator=g) for _ in range(4)]


def stream_main(rank, world, store, out, llama_dir):
    """One rank streaming ``llama_dir`` on its contiguous share of the windows, writing into ``out``."""
    import amgfx
    from amgfx.stream import prune_streamed
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        share = len(stream_windows()) // world
        r = prune_streamed(llama_dir, amgfx.PlanConfig(**STREAM_CONFIG), calib=stream_windows()[rank * share:(rank + 1) * share],
                           out=os.path.join(out, "stream"), max_new_tokens=4, progress=False)
        r.plan.save(os.path.join(out, f"rank{rank}.json"))
        torch.save({"kept": len(r.weights), "out": r.out}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
