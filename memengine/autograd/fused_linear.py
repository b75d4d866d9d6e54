"""FusedLinearFunction: a Linear layer's forward whose backward adds dW and db into fp32 gradient
buffers instead of returning them.

y = x @ W^T + b (transposed=False, W [out, in]) or y = x @ W + b (transposed=True, W [in, out],
Hugging Face's Conv1D). The backward computes grad_input as usual and hands grad_output and the
input to `sink` (the parameters' GradBuffer), which accumulates them with wgrad_accumulate_ and
bias_grad_accumulate_; autograd receives no gradient for the weight and bias.

Only when the running backward accumulates them, though: the engine's will-execute information
tells apart loss.backward() (into the buffer), torch.autograd.grad naming the weight (dW is returned
as F.linear's backward would, the buffer untouched) and torch.autograd.grad / backward(inputs=...)
for other tensors (no weight gradient at all). With create_graph=True the input gradient records its
dependence on the weight (gradient penalties); accumulating a differentiable gradient into the
buffer is refused.
"""

import contextlib

import torch
import torch.nn.functional as F


def _autocast_dtype(device_type):
    # The meta device has no autocast (asking raises): memengine.plan's predictions run the model there.
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


ACCUMULATE, RETURN = "accumulate", "return"


def gradient_destination(node, index):
    """Where the running backward wants the gradient of input `index` (a leaf parameter) of `node`:
    ACCUMULATE when autograd would accumulate it into .grad (loss.backward(), or backward(inputs=...)
    naming it), RETURN when torch.autograd.grad asks for it, None when nobody wants it
    (torch.autograd.grad or backward(inputs=...) for other tensors). Decided by the engine's own
    will-execute information on the parameter's AccumulateGrad node, as torch.autograd.graph's
    multi-grad hooks do."""
    accumulator = node.next_functions[index][0]
    if accumulator is None:
        return None
    try:
        executes = torch._C._will_engine_execute_node(accumulator)
    except RuntimeError as error:
        # The engine refuses exactly one case: a leaf whose gradient torch.autograd.grad captures
        # ("A leaf node was passed to _will_engine_execute_node but we are currently running
        # autograd.grad()"). Anything else is not ours to interpret.
        if "autograd.grad" not in str(error):
            raise
        return RETURN
    return ACCUMULATE if executes else None


class FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, transposed, sink):
        ctx.transposed = transposed
        ctx.sink = sink
        ctx.parameters = (weight, bias)  # the Parameters themselves: the sink needs their main_grad
        ctx.cast = _autocast_dtype(input.device.type)
        # Only an enabled autocast needs switching off (the meta device has none to switch).
        no_autocast = (
            torch.autocast(input.device.type, enabled=False) if ctx.cast is not None else contextlib.nullcontext()
        )
        with no_autocast:
            if ctx.cast is not None:  # compute in the autocast dtype, as F.linear would, and save the cast tensors
                input, weight = input.to(ctx.cast), weight.to(ctx.cast)
                bias = None if bias is None else bias.to(ctx.cast)
            output = F.linear(input, weight.t() if transposed else weight, bias)
        ctx.save_for_backward(input, weight)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        weight_parameter, bias_parameter = ctx.parameters
        # create_graph=True: the returned gradients must record their dependence on the parameters.
        differentiable = torch.is_grad_enabled()
        if differentiable and ctx.cast is not None:
            weight = weight_parameter.to(ctx.cast)  # the saved cast copy has no autograd history
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output @ (weight.t() if ctx.transposed else weight)
        grad_weight = grad_bias = None
        weight_destination = gradient_destination(ctx, 1)
        # next_functions has one entry per tensor argument: input, weight, then bias unless it is None.
        bias_destination = None if bias_parameter is None else gradient_destination(ctx, 2)
        if differentiable and ACCUMULATE in (weight_destination, bias_destination):
            raise RuntimeError(
                "memengine fused Linear: backward(create_graph=True) would accumulate a differentiable weight "
                "gradient into .grad, but the fp32 GradBuffer holds gradient values only (no graph for a second "
                "backward). For gradient penalties take the inner gradient with torch.autograd.grad(..., "
                "inputs=..., create_graph=True), which leaves the buffer alone, and call .backward() without "
                "create_graph; or memengine.unpatch(model) for higher-order training"
            )
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        if weight_destination == ACCUMULATE:
            if ctx.transposed:  # W [in, out]: dW = input^T @ grad_output
                ctx.sink.add_weight_gradient(weight_parameter, input, grad_output)
            else:
                ctx.sink.add_weight_gradient(weight_parameter, grad_output, input)
        elif weight_destination == RETURN:  # torch.autograd.grad: the value, as F.linear's backward computes it
            if differentiable and ctx.cast is not None and ctx.needs_input_grad[0]:
                raise RuntimeError(
                    "memengine fused Linear: torch.autograd.grad(..., create_graph=True) of a fused weight under "
                    "autocast: the weight gradient's dependence on the input is not recorded (the input was cast "
                    "inside the layer); run that computation outside torch.autocast or memengine.unpatch(model)"
                )
            input_rows = input.reshape(-1, input.shape[-1])
            grad_weight = input_rows.t() @ grad_rows if ctx.transposed else grad_rows.t() @ input_rows
        if bias_destination == ACCUMULATE:
            ctx.sink.add_bias_gradient(bias_parameter, grad_output)
        elif bias_destination == RETURN:
            grad_bias = grad_rows.sum(0)
        return grad_input, grad_weight, grad_bias, None, None
