"""Shared by the Trainer and accelerate tests: small bf16 causal LMs with random weights, a token
dataset with a different number of real tokens per row, and the usual fp32-master-weights
recipe without memengine, which both integrations are compared against."""

import math

import torch
import transformers

MODEL_KINDS = ("gpt2", "llama")
VOCAB, LENGTH = 256, 32


def make_model(kind, seed=0, width=64, vocab=VOCAB):
    """A small bf16 causal LM of hidden size `width`; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=width, n_head=4, vocab_size=vocab, n_positions=LENGTH, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=LENGTH,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = transformers.LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def make_dataset(rows=160, seed=1):
    """Learnable rows of LENGTH tokens (counting up from a random start, modulo VOCAB: each token
    follows from the one before it) whose last 0..7 labels are -100, so micro-batches hold different token
    counts."""
    generator = torch.Generator().manual_seed(seed)
    rows_out = []
    for row in range(rows):
        start = int(torch.randint(0, VOCAB, (), generator=generator))
        input_ids = (start + torch.arange(LENGTH)) % VOCAB
        labels = input_ids.clone()
        labels[LENGTH - row % 8 :] = -100
        rows_out.append({"input_ids": input_ids, "labels": labels})
    return rows_out


def accumulate_gradients_in_fp32(model):
    """Plain autograd, but each bf16 parameter's .grad is fp32 (torch's grad_dtype): micro-batches
    add in fp32, as in memengine's buffer. The closest plain-PyTorch reference for its numbers."""
    for p in model.parameters():
        p.grad_dtype = torch.float32
    return model


def buffer_norm(buffer):
    """The L2 norm of the gradients in a GradBuffer, computed in fp64 over the parameters that
    received one in the current window: what clipping should see."""
    received = [p.main_grad.double() for p in buffer.params if buffer.received_gradient(p)]
    return math.sqrt(sum(float(g.square().sum()) for g in received))


class Fp32MasterAdamW(torch.optim.AdamW):
    """The usual mixed-precision recipe, no memengine: the model's bf16 parameters get bf16 .grad
    from autograd (micro-batches add in bf16; fp32 after accumulate_gradients_in_fp32); step()
    gives fp32 copies of them to fp32 master weights, which AdamW steps, and copies the masters
    back into the model. Built over groups of model parameters, as torch.optim takes them."""

    def __init__(self, param_groups, **options):
        self.model_and_master = []
        master_groups = []
        for group in param_groups:
            masters = []
            for p in group["params"]:
                master = torch.nn.Parameter(p.detach().float())
                self.model_and_master.append((p, master))
                masters.append(master)
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **options)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None
        for p, master in self.model_and_master:
            master.grad = None if p.grad is None else p.grad.float()
        super().step()
        for p, master in self.model_and_master:
            p.copy_(master)
            master.grad = None

    def zero_grad(self, set_to_none=True):
        for p, _ in self.model_and_master:
            p.grad = None
