"""memengine.causal_lm_loss takes the fused linear + cross-entropy path for the models it recognises (memengine's
GPT, Hugging Face causal LMs of losses.FUSED_LOSS_MODEL_TYPES): the loss equals Hugging Face's own within 1e-5
relative, and every gradient is no further from an fp64 oracle than through the logits (today's path) beyond
rounding noise, for plain, tied (Llama tie_word_embeddings, GPT-2), soft-capped (Gemma 2) and scaled (Cohere)
heads; an unrecognised model falls back to the logits."""

import copy
import warnings

import pytest
import torch

import memengine as me
from memengine.engine import losses
from memengine.models.gpt import GPT

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the CI installs it)")
VOCAB = 300


def hugging_face(kind):
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    common.update(num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif kind == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0)
    elif kind == "cohere":
        config = transformers.CohereConfig(**common, logit_scale=0.25)
    else:
        config = transformers.LlamaConfig(**common, tie_word_embeddings=kind == "llama-tied")
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
    labels = ids.clone()
    labels[0, :9] = -100  # a prompt
    return {"input_ids": ids, "labels": labels}


def main_grads(model, micro_batch, fused):
    model = copy.deepcopy(model)
    buffer = me.patch(model)
    buffer.zero_()
    loss, count = me.causal_lm_loss(model, micro_batch, fused=fused)
    (loss / count).backward()
    return (loss / count).item(), {name: p.main_grad for name, p in model.named_parameters()}


def relative(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gpt2", "gemma2", "cohere"])
def test_fused_loss_matches_hugging_face_and_the_logits_path(kind):
    model = hugging_face(kind)
    micro_batch = batch()
    assert losses.language_model_parts(model) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_loss = model(**micro_batch).loss.item()
        oracle = copy.deepcopy(model).double()
        oracle(**micro_batch).loss.backward()
    exact = {name: p.grad for name, p in oracle.named_parameters()}
    fused_loss, fused = main_grads(model, micro_batch, fused=True)
    _, through_logits = main_grads(model, micro_batch, fused=False)
    assert fused_loss == pytest.approx(hf_loss, rel=1e-5)
    scale = torch.cat([g.flatten() for g in exact.values() if g is not None]).norm()
    for name, gradient in exact.items():
        if gradient is None or gradient.norm() <= 1e-6 * scale:
            continue  # exactly-zero gradients (a key bias) are rounding noise in fp64
        # Both paths share the bf16 model's forward and backward noise; the fused one removes the logits' rounding.
        assert relative(fused[name], gradient) <= 1.25 * relative(through_logits[name], gradient), name


def test_memengine_gpt_takes_the_fused_path():
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, width=32, layers=2, heads=2, length=24)
    tokens = batch()["input_ids"]
    assert losses.language_model_parts(model) is not None
    loss, count = me.causal_lm_loss(model, tokens)
    logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert int(count) == tokens[:, 1:].numel()


def test_an_unrecognised_model_falls_back_to_the_logits():
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens):
            return self.inner(tokens) * 1.0

    torch.manual_seed(0)
    model = Wrapper(GPT(vocab=VOCAB, width=32, layers=2, heads=2, length=24))
    assert losses.language_model_parts(model) is None
    tokens = batch()["input_ids"]
    loss, _ = me.causal_lm_loss(model, tokens)
    assert loss.requires_grad


def test_the_memory_report_says_which_loss_path_ran():
    torch.manual_seed(0)
    fused = me.Engine(GPT(vocab=VOCAB, width=32, layers=2, heads=2, length=24), torch.optim.SGD, micro_batch_size=2)
    report = fused.memory_report(batch()["input_ids"])
    assert "fused linear cross-entropy" in report.loss and f"loss: {report.loss}" in str(report)
    wrapped = torch.nn.Sequential(GPT(vocab=VOCAB, width=32, layers=2, heads=2, length=24))
    plain = me.Engine(wrapped, torch.optim.SGD, micro_batch_size=2)
    assert "through the logits" in plain.memory_report(batch()["input_ids"]).loss
