"""Train one model in several processes with torch.distributed (DistributedDataParallel).

    torchrun --nproc-per-node 2 examples/distributed.py     # or: python examples/distributed.py

The same script runs in one process too. ``batch_size`` is the global batch, so both runs
train the same model: with the solvers' steps agreed over the processes (the default), the
weights match to rounding. Rank 0 writes the checkpoint and prints.
"""

import torch

import cnf
from cnf.data import sample_tensor, toy_sampler
from cnf.training import fit

world = cnf.distributed.init()  # joins torchrun's process group; None in a plain process
torch.set_num_threads(1)
torch.manual_seed(0)  # every process builds the same model (DDP also copies rank 0's)
flow = cnf.CNF(cnf.ConcatSquashMLP(2, hidden=(64, 64, 64)), (2,), T=0.5, train_T=True)
flow.to(world.device if world is not None else "cpu")
history = fit(
    flow,
    toy_sampler("pinwheel"),
    iters=200,
    batch_size=512,  # the global batch: 256 rows per process with two
    lr=3e-3,
    schedule="cosine",
    eval_data=sample_tensor("pinwheel", 2000, seed=1),  # scored in shards, summed
    eval_every=100,
    checkpoint_dir="runs/distributed",
    progress=False,
)
if world is None or world.main:
    processes = 1 if world is None else world.size
    print(f"{processes} process(es); held-out NLL (nats):", [round(v, 3) for v in history.eval_nll])
cnf.distributed.finish()
