"""memengine.nn.Embedding: a torch.nn.Embedding (same parameters, same state_dict) whose backward adds the
weight's gradient straight into its fp32 main_grad when a GradBuffer covers it (repeated tokens summed in fp32;
no dense [vocabulary, hidden] gradient temporary). Otherwise, and for max_norm, scale_grad_by_freq or sparse
embeddings (which memengine.patch does not convert), it is exactly torch.nn.Embedding."""

import torch
import torch.nn.functional as F

from memengine.autograd.fused_embedding import FusedEmbeddingFunction
from memengine.grad import buffer_of


def convertible(module):
    """Whether memengine.patch gives `module` (exactly a torch.nn.Embedding) the fused backward."""
    return (
        type(module) is torch.nn.Embedding
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and (not module.sparse)
    )


class Embedding(torch.nn.Embedding):
    def forward(self, input):
        sink = buffer_of(self.weight)
        if sink is None or not self.weight.requires_grad or not torch.is_grad_enabled():
            return F.embedding(input, self.weight, self.padding_idx)
        return FusedEmbeddingFunction.apply(input, self.weight, self.padding_idx, sink)
