"""Solve and differentiate an ODE with cnf's solver core.

A damped oscillator dy/dt = A y has the closed-form solution y(t) = expm(A t) y0; we solve it
with dopri5, compare with the closed form, and differentiate a loss through the adjoint.
"""

import torch

import cnf

torch.set_default_dtype(torch.float64)


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.1, 1.0], [-1.0, -0.1]]))

    def forward(self, t, y):
        return y @ self.A.T


field = Linear()
y0 = torch.tensor([[1.0, 0.0]], requires_grad=True)
t = torch.linspace(0.0, 10.0, 6)

sol = cnf.solve(field, y0, t, rtol=1e-8, atol=1e-10, adjoint=True)
exact = torch.stack([y0 @ torch.linalg.matrix_exp(field.A * ti).T for ti in t])
print(f"max error against expm: {(sol.ys - exact).abs().max().item():.2e}")

loss = sol.ys[-1].square().sum()
loss.backward()
print(f"dL/dy0 = {y0.grad.tolist()}")
print(f"dL/dA  = {field.A.grad.tolist()}")
print(
    f"forward: {sol.stats.nfe} evaluations, {sol.stats.n_accepted} steps; "
    f"backward: {sol.stats.nfe_backward} evaluations"
)
