"""LinearCrossEntropyFunction: a language model's head and cross-entropy loss whose logits never exist whole.

forward(hidden, weight, bias, labels, options, sink) -> (loss sum, token count), computed tile by tile
(memengine.ops.linear_cross_entropy). The backward recomputes each tile's logits and, when the running
backward accumulates the head's gradients (loss.backward()) and the head belongs to a GradBuffer (`sink`),
adds each tile's weight and bias gradient straight into main_grad (wgrad_accumulate_ and
bias_grad_accumulate_ in fp32, the first tile of a window overwriting): no [vocabulary, hidden] gradient
exists, and autograd receives none for them. torch.autograd.grad naming the weight, or a head without a
buffer, gets the gradient returned as F.linear's backward would give it (a dense tensor).
"""

import torch

from memengine import ops
from memengine.autograd.fused_linear import ACCUMULATE, gradient_destination
from memengine.ops.linear_cross_entropy import linear_cross_entropy_backward, linear_cross_entropy_forward


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options, sink):
        loss_sum, count, lse = linear_cross_entropy_forward(hidden, weight, labels, bias, **options)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.parameters = (weight, bias)  # the Parameters themselves: the sink needs their main_grad
        ctx.options, ctx.sink = options, sink
        ctx.mark_non_differentiable(count)
        return loss_sum, count

    @staticmethod
    def backward(ctx, grad_loss, _grad_count):
        hidden, weight, labels, lse = ctx.saved_tensors
        weight_parameter, bias_parameter = ctx.parameters
        if torch.is_grad_enabled():
            raise RuntimeError(
                "memengine.linear_cross_entropy: backward(create_graph=True) is not supported (its gradients are "
                "computed tile by tile without an autograd graph); compute the loss from the logits for "
                "higher-order gradients"
            )
        weight_destination = gradient_destination(ctx, 1) if ctx.needs_input_grad[1] else None
        bias_destination = gradient_destination(ctx, 2) if ctx.needs_input_grad[2] else None
        grad_weight = grad_bias = None
        weight_sink = bias_sink = None
        claimed = []
        if weight_destination == ACCUMULATE and ctx.sink is not None:
            overwrite = ctx.sink.claim(weight_parameter)
            claimed.append(weight_parameter)

            def weight_sink(first, start, end, grad, rows):
                ops.wgrad_accumulate_(weight_parameter.main_grad[start:end], grad, rows, overwrite=overwrite and first)

        elif weight_destination is not None:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

            def weight_sink(first, start, end, grad, rows):
                ops.wgrad_accumulate_(grad_weight[start:end], grad, rows)

        if bias_destination == ACCUMULATE and ctx.sink is not None:
            bias_overwrite = ctx.sink.claim(bias_parameter)
            claimed.append(bias_parameter)

            def bias_sink(first, start, end, grad):
                ops.bias_grad_accumulate_(bias_parameter.main_grad[start:end], grad, overwrite=bias_overwrite and first)

        elif bias_destination is not None:
            grad_bias = torch.zeros(bias_parameter.shape, dtype=torch.float32, device=weight.device)

            def bias_sink(first, start, end, grad):
                grad_bias[start:end] += grad.sum(0)

        grad_hidden = linear_cross_entropy_backward(
            grad_loss,
            hidden,
            weight,
            labels,
            lse,
            bias_parameter,
            weight_sink=weight_sink,
            bias_sink=bias_sink,
            need_hidden=ctx.needs_input_grad[0],
            **ctx.options,
        )
        for p in claimed:
            ctx.sink.contributed(p)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_parameter.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None
