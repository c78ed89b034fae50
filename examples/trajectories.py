"""Follow base points along a flow: states at intermediate times, and a picture of the paths."""

import torch

import cnf
from cnf.plot import plot_trajectories

torch.manual_seed(0)
field = cnf.ConcatSquashMLP(2, hidden=(32, 32))
with torch.no_grad():  # an untrained field scaled up, so that the paths bend visibly
    for p in field.parameters():
        p.mul_(2.0)
flow = cnf.CNF(field, (2,), T=1.0)

z = flow.base.sample((5,))
times = torch.linspace(0.0, 1.0, 6)
with torch.no_grad():
    path = flow.trajectory(z, times)  # (6, 5, 2): base points carried to data
    back = flow.trajectory(path[-1], times.flip(0), direction="normalizing")
print("start:", path[0][0].tolist(), "end:", path[-1][0].tolist())
print("round trip error:", (back[-1] - z).abs().max().item())
plot_trajectories(flow, n=200).savefig("trajectories.png")
