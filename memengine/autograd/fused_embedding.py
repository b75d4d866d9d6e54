"""FusedEmbeddingFunction: an embedding lookup whose backward adds the weight's gradient straight into its fp32
buffer (embedding_grad_accumulate_: repeated tokens summed in fp32, no dense [vocabulary, hidden] gradient),
returning none to autograd, when the running backward accumulates it (loss.backward()); torch.autograd.grad
naming the weight gets it as F.embedding's backward gives it."""

import torch
import torch.nn.functional as F

from memengine.autograd.fused_linear import ACCUMULATE, RETURN, gradient_destination
from memengine.ops.embedding_grad import embedding_grad_accumulate_


class FusedEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, index, weight, padding_idx, sink):
        ctx.save_for_backward(index)
        ctx.weight, ctx.padding_idx, ctx.sink = weight, padding_idx, sink
        return F.embedding(index, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        (index,) = ctx.saved_tensors
        weight = ctx.weight
        destination = gradient_destination(ctx, 1)
        if destination == ACCUMULATE:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    "memengine fused Embedding: backward(create_graph=True) would accumulate a differentiable "
                    "weight gradient, but the fp32 GradBuffer holds gradient values only; call .backward() without "
                    "create_graph, or memengine.unpatch(model) for higher-order training"
                )
            embedding_grad_accumulate_(
                weight.main_grad, index, grad_output, ctx.padding_idx, overwrite=ctx.sink.claim(weight)
            )
            ctx.sink.contributed(weight)
            return None, None, None, None
        if destination == RETURN:
            grad = torch.ops.aten.embedding_dense_backward(
                grad_output, index, weight.shape[0], -1 if ctx.padding_idx is None else ctx.padding_idx, False
            )
            return None, grad, None, None
        return None, None, None, None
