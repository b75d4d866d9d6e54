"""A residual MLP block of any width."""

import torch
import torch.nn.functional as F


class MlpBlock(torch.nn.Module):
    """A pre-norm residual MLP block of any hidden width: chains of these with varying widths are
    the heterogeneous chains of the planner's tests and benchmark."""

    def __init__(self, width, hidden):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))
