"""FusedLinearFunction: a Linear layer's forward whose backward adds dW and db into fp32 gradient
buffers instead of returning them.

y = x @ W^T + b (transposed=False, W [out, in]) or y = x @ W + b (transposed=True, W [in, out],
Hugging Face's Conv1D). The backward computes grad_input as usual and hands grad_output and the
input to `sink` (the parameters' GradBuffer), which accumulates them with wgrad_accumulate_ and
bias_grad_accumulate_; autograd receives no gradient for the weight and bias.
"""

import torch
import torch.nn.functional as F


def _autocast_dtype(device_type):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, transposed, sink):
        ctx.transposed = transposed
        ctx.sink = sink
        ctx.parameters = (weight, bias)  # the Parameters themselves: the sink needs their main_grad
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
            if ctx.transposed:  # W [in, out]: dW = input^T @ grad_output
                ctx.sink.add_weight_gradient(weight_parameter, input, grad_output)
            else:
                ctx.sink.add_weight_gradient(weight_parameter, grad_output, input)
        if bias_parameter is not None and ctx.needs_input_grad[2]:
            ctx.sink.add_bias_gradient(bias_parameter, grad_output)
        return grad_input, None, None, None, None
