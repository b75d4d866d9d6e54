"""Drop-in layers whose backward adds dW and db straight into the parameters' fp32 main_grad.

memengine.nn.Linear is a torch.nn.Linear (same parameters, same state_dict). When its weight
belongs to a GradBuffer (has main_grad) and needs a gradient, backward computes grad_input as
usual and accumulates grad_output^T @ input into weight.main_grad with wgrad_accumulate_ (and
the column sums of grad_output into bias.main_grad): no weight-gradient tensor is allocated and
nothing is rounded to bf16. Otherwise it is exactly torch.nn.Linear.

Conv1DFusedMixin does the same for Hugging Face transformers' Conv1D (GPT-2), whose weight is
stored as [in, out]: its gradient input^T @ grad_output is wgrad_accumulate_ with the two
operands swapped, so no transpose is needed either.
"""

import torch
import torch.nn.functional as F

from memengine.grad_buffer import buffer_of


def _autocast_dtype(device_type):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _FusedLinearFunction(torch.autograd.Function):
    """y = x @ W^T + b (transposed=False, W [out, in]) or y = x @ W + b (transposed=True, W [in, out]);
    backward folds dW and db into main_grad and returns no gradient for them."""

    @staticmethod
    def forward(ctx, input, weight, bias, transposed):
        ctx.transposed = transposed
        ctx.parameters = (weight, bias)  # the Parameters themselves: backward needs their main_grad
        cast = _autocast_dtype(input.device.type)
        with torch.autocast(input.device.type, enabled=False):
            if cast is not None:  # compute in the autocast dtype, as F.linear would, and save the cast tensors
                input, weight = input.to(cast), weight.to(cast)
                bias = None if bias is None else bias.to(cast)
            output = F.linear(input, weight.t() if transposed else weight, bias)
        ctx.save_for_backward(input, weight)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        weight_parameter, bias_parameter = ctx.parameters
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output @ (weight.t() if ctx.transposed else weight)
        if ctx.needs_input_grad[1]:
            buffer = buffer_of(weight_parameter)
            if ctx.transposed:  # W [in, out]: dW = input^T @ grad_output
                buffer.add_weight_gradient(weight_parameter, input, grad_output)
            else:
                buffer.add_weight_gradient(weight_parameter, grad_output, input)
        if bias_parameter is not None and ctx.needs_input_grad[2]:
            buffer_of(bias_parameter).add_bias_gradient(bias_parameter, grad_output)
        return grad_input, None, None, None


def _fused_linear(input, weight, bias, transposed):
    """The fused function's output when every trainable parameter of the layer has a main_grad
    and autograd is recording; None otherwise (the caller then runs the plain layer, and any
    gradient reaches main_grad through the GradBuffer's hooks)."""
    trainable = [p for p in (weight, bias) if p is not None and p.requires_grad]
    if not torch.is_grad_enabled() or not trainable or any(buffer_of(p) is None for p in trainable):
        return None
    return _FusedLinearFunction.apply(input, weight, bias, transposed)


class Linear(torch.nn.Linear):
    """torch.nn.Linear whose backward accumulates dW and db into main_grad when a GradBuffer covers it."""

    def forward(self, input):
        output = _fused_linear(input, self.weight, self.bias, transposed=False)
        return F.linear(input, self.weight, self.bias) if output is None else output


class Conv1DFusedMixin:
    """Mixed into a Hugging Face Conv1D subclass by memengine.patch (weight [in, out], bias [out])."""

    def forward(self, x):
        output = _fused_linear(x, self.weight, self.bias, transposed=True)
        return super().forward(x) if output is None else output
