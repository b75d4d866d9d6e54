"""memengine.nn.Linear: a torch.nn.Linear (same parameters, same state_dict) whose backward adds
dW and db straight into the parameters' fp32 main_grad when a GradBuffer covers them: no
weight-gradient tensor is allocated and nothing is rounded to bf16. Otherwise it is exactly
torch.nn.Linear.
"""

import torch
import torch.nn.functional as F

from memengine.autograd import FusedLinearFunction
from memengine.grad import buffer_of


def fused_linear(input, weight, bias, transposed):
    """The fused function's output when every trainable parameter of the layer belongs to one
    GradBuffer and autograd is recording; None otherwise (the caller then runs the plain layer,
    and any gradient reaches main_grad through the GradBuffer's hooks)."""
    trainable = [p for p in (weight, bias) if p is not None and p.requires_grad]
    if not torch.is_grad_enabled() or not trainable:
        return None
    buffers = {id(buffer_of(p)): buffer_of(p) for p in trainable}
    if len(buffers) != 1 or None in buffers.values():
        return None
    (sink,) = buffers.values()
    return FusedLinearFunction.apply(input, weight, bias, transposed, sink)


class Linear(torch.nn.Linear):
    """torch.nn.Linear whose backward accumulates dW and db into main_grad when a GradBuffer covers it."""

    def forward(self, input):
        output = fused_linear(input, self.weight, self.bias, transposed=False)
        return F.linear(input, self.weight, self.bias) if output is None else output
