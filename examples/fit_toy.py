"""Fit a 2-D density with the public API and save a picture of it."""

import torch

import cnf
from cnf.data import sample_tensor, toy_sampler
from cnf.plot import plot_density
from cnf.training import fit

torch.manual_seed(0)
flow = cnf.CNF(cnf.ConcatSquashMLP(2, hidden=(64, 64, 64)), (2,), T=0.5, train_T=True)
history = fit(
    flow,
    toy_sampler("pinwheel"),
    iters=300,
    batch_size=512,
    lr=3e-3,
    schedule="cosine",
    eval_data=sample_tensor("pinwheel", 2000, seed=1),
    eval_every=100,
    progress=False,
)
print("held-out NLL (nats):", [round(v, 3) for v in history.eval_nll])
plot_density(flow, data=cnf.data.sample("pinwheel", 20000, seed=0)).savefig("pinwheel.png")
