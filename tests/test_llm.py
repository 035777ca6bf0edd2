"""CheferLLMAttribution against an independent computation of the paper's rules on eager attention.

Each reference below runs its own forward pass on an eager copy of the model (``output_attentions=True``:
in eager mode the returned probabilities are the tensors multiplied with the values), takes one plain
backward pass per output token, and forms the dense relevance matrices with its own loops (rule 6 for
decoder-only models; rules 6-10 with the normalisation of Eq. 8-9 for encoder-decoders). Nothing from
``captum_chefer.relevance`` is used for the expected values. Models are tiny and random (built from
configs, with a larger initializer range so that attention is far from uniform); the tokenizer comes from
a vocab file written here.
"""

from __future__ import annotations

import copy
import io
import json
import warnings

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from captum.attr import LayerIntegratedGradients, LLMAttributionResult, LLMGradientAttribution, TextTokenInput
from torch import nn

from captum_chefer import CheferLLMAttribution
from captum_chefer.llm import LLMImageAttributionResult

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*attention_mask.*")

WORDS = [
    "the", "a", "patient", "has", "fever", "cough", "pain", "chest", "no", "and", "with", "mild", "severe", "left",
    "right", "denies", "reports",
]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("vocab") / "vocab.json"
    path.write_text(json.dumps({w: i for i, w in enumerate(SPECIAL + WORDS)}))
    backend = Tokenizer(models.WordLevel.from_file(str(path), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


VOCAB = len(SPECIAL) + len(WORDS)
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def gpt2(layers=3, seed=0, heads=4):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=layers, n_head=heads,
                                     initializer_range=0.3, **IDS)
    return transformers.GPT2LMHeadModel(config).eval()


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, **IDS)
    return transformers.LlamaForCausalLM(config).eval()


def bart(seed=0):
    torch.manual_seed(seed)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, init_std=0.3,
        decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None, **IDS)
    return transformers.BartForConditionalGeneration(config).eval()


def t5(seed=0):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
                                   initializer_factor=3.0)
    return transformers.T5ForConditionalGeneration(config).eval()


def vit_gpt2(seed=0, encoder=transformers.ViTConfig, patch_size=4):
    torch.manual_seed(seed)
    vit = encoder(image_size=16, patch_size=patch_size, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=48, initializer_range=0.3)
    decoder = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      initializer_range=0.3, **IDS)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    return transformers.VisionEncoderDecoderModel(config=config).eval()


# --------------------------------------------------------------------------------- the independent reference


def _eager_copy(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def _a_bar(attention, gradient):
    return (attention.detach() * gradient).clamp(min=0).mean(dim=1)[0]  # [Q, K], batch of one


def _norm(r):
    """(R - I) / rowsum(R - I) + I; a row of R - I that sums to zero keeps the identity row."""
    eye = torch.eye(r.shape[0])
    extra = r - eye
    total = extra.sum(dim=1, keepdim=True)
    scaled = torch.where(
        total != 0, extra / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(extra)
    )
    return scaled + eye


def _targets(logits_rows, target, kind):
    rows = logits_rows.log_softmax(-1) if kind == "log_prob" else logits_rows
    return rows[torch.arange(len(target)), target]


def reference_decoder_only(model, prompt, target, kind="logit"):
    """token_attr [K, P]: row P-1+j of (I + A_n)...(I + A_1) minus e_(P-1+j), over the prompt."""
    ref = _eager_copy(model)
    ids = torch.cat([prompt, target]).unsqueeze(0)
    embeds = ref.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = ref(inputs_embeds=embeds, output_attentions=True, use_cache=False)
    maps = out.attentions
    P, T = len(prompt), ids.shape[1]
    y = _targets(out.logits[0, P - 1 : P - 1 + len(target)], target, kind)
    rows = []
    for j in range(len(target)):
        grads = torch.autograd.grad(y[j], maps, retain_graph=True, allow_unused=True)
        relevance = torch.eye(T)
        for a, g in zip(maps, grads, strict=True):
            if g is not None:  # a layer no gradient reaches adds nothing
                relevance = relevance + _a_bar(a, g) @ relevance
        p = P - 1 + j
        rows.append((relevance[p] - torch.eye(T)[p])[:P])
    return torch.stack(rows)


def reference_encoder_decoder(model, target, kind="logit", without_cross=(), **encoder_inputs):
    """token_attr [K, Ti]: row j of R_qi after rules 6-10, dense (without the cross-attention of the layers
    ``without_cross``)."""
    ref = _eager_copy(model)
    start = model.config.decoder_start_token_id
    decoder_ids = torch.cat([torch.tensor([start]), target[:-1]]).unsqueeze(0)
    if "input_ids" in encoder_inputs:
        ids = encoder_inputs["input_ids"]
        encoder_inputs = {"inputs_embeds": ref.get_encoder().get_input_embeddings()(ids).detach().requires_grad_(True)}
    else:
        encoder_inputs = {"pixel_values": encoder_inputs["pixel_values"].clone().requires_grad_(True)}
    decoder_embeds = ref.get_decoder().get_input_embeddings()(decoder_ids).detach().requires_grad_(True)
    out = ref(**encoder_inputs, decoder_inputs_embeds=decoder_embeds, output_attentions=True, use_cache=False)
    enc, dec, cross = out.encoder_attentions, out.decoder_attentions, out.cross_attentions
    y = _targets(out.logits[0, : len(target)], target, kind)
    Ti, Tq = enc[0].shape[-1], dec[0].shape[-1]
    rows = []
    for j in range(len(target)):
        grads = torch.autograd.grad(y[j], enc + dec + cross, retain_graph=True)
        g_enc, g_dec, g_cross = grads[: len(enc)], grads[len(enc) : len(enc) + len(dec)], grads[len(enc) + len(dec) :]
        r_ii = torch.eye(Ti)
        for a, g in zip(enc, g_enc, strict=True):
            r_ii = r_ii + _a_bar(a, g) @ r_ii
        r_qq, r_qi = torch.eye(Tq), torch.zeros(Tq, Ti)
        for layer, (a_s, g_s, a_c, g_c) in enumerate(zip(dec, g_dec, cross, g_cross, strict=True)):
            s = _a_bar(a_s, g_s)
            r_qq, r_qi = r_qq + s @ r_qq, r_qi + s @ r_qi
            if layer not in without_cross:
                r_qi = r_qi + _norm(r_qq).T @ _a_bar(a_c, g_c) @ _norm(r_ii)
        rows.append(r_qi[j])
    return torch.stack(rows)


def assert_matches(actual, expected):
    assert expected.abs().max() > 0 and expected.std() > 0, "a degenerate reference cannot tell anything apart"
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


# --------------------------------------------------------------------------------- equality with the reference


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["logit", "log_prob"])
def test_decoder_only_equals_the_dense_rule(tokenizer, make, kind):
    model = make()
    inp = TextTokenInput("the patient has fever and", tokenizer)
    target = torch.tensor(tokenizer.encode("mild chest pain with cough", add_special_tokens=False))
    result = CheferLLMAttribution(model, tokenizer).attribute(inp, target=target, gradient_target=kind)
    expected = reference_decoder_only(model, inp.inp_tensor[0], target, kind)
    assert isinstance(result, LLMAttributionResult)
    assert result.input_tokens == ["<s>", "the", "patient", "has", "fever", "and"]
    assert result.output_tokens == ["mild", "chest", "pain", "with", "cough"]
    assert_matches(result.token_attr, expected)
    torch.testing.assert_close(result.seq_attr, expected.sum(0), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_every_chunking_gives_the_same_rows(tokenizer, chunk_size):
    model = gpt2()
    inp = TextTokenInput("the patient has fever", tokenizer)
    target = torch.tensor(tokenizer.encode("and mild chest pain with cough", add_special_tokens=False))
    result = CheferLLMAttribution(model, tokenizer).attribute(inp, target=target, chunk_size=chunk_size)
    assert_matches(result.token_attr, reference_decoder_only(model, inp.inp_tensor[0], target))


def test_skip_tokens_drop_columns_not_inputs(tokenizer):
    model = gpt2()
    inp = TextTokenInput("the patient has fever", tokenizer, skip_tokens=["<s>"])
    target = torch.tensor(tokenizer.encode("and cough", add_special_tokens=False))
    result = CheferLLMAttribution(model, tokenizer).attribute(inp, target=target)
    expected = reference_decoder_only(model, inp.inp_tensor[0], target)  # the model still reads <s>
    assert result.input_tokens == ["the", "patient", "has", "fever"]
    assert_matches(result.token_attr, expected[:, 1:])


@pytest.mark.parametrize("make", [bart, t5], ids=["bart", "t5"])
@pytest.mark.parametrize("kind", ["logit", "log_prob"])
def test_encoder_decoder_equals_the_dense_rules(tokenizer, make, kind):
    model = make()
    inp = TextTokenInput("patient reports severe chest pain and mild cough", tokenizer)
    target = torch.tensor(tokenizer.encode("chest pain cough", add_special_tokens=False))
    result = CheferLLMAttribution(model, tokenizer).attribute(inp, target=target, gradient_target=kind)
    expected = reference_encoder_decoder(model, target, kind, input_ids=inp.inp_tensor)
    assert result.input_tokens == inp.values and result.output_tokens == ["chest", "pain", "cough"]
    assert_matches(result.token_attr, expected)


def test_vision_encoder_decoder_equals_the_dense_rules_and_maps_patches_to_pixels(tokenizer):
    model = vit_gpt2()
    torch.manual_seed(1)
    pixels = torch.randn(3, 16, 16)
    target = torch.tensor(tokenizer.encode("left chest pain", add_special_tokens=False))
    result = CheferLLMAttribution(model, tokenizer).attribute(pixels, target=target)
    expected = reference_encoder_decoder(model, target, pixel_values=pixels.unsqueeze(0))
    assert isinstance(result, LLMImageAttributionResult)
    assert result.input_tokens[:3] == ["[CLS]", "patch 0,0", "patch 0,1"] and len(result.input_tokens) == 17
    assert_matches(result.token_attr, expected)
    # each 4x4 patch of 3 channels holds its relevance spread evenly: 48 pixels of token_attr / 48
    assert result.image_attr.shape == (3, 3, 16, 16)
    patch = expected[:, 1:].reshape(3, 4, 4)  # row-major patch grid
    expected_pixels = (patch / 48).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand(3, 3, 16, 16)
    torch.testing.assert_close(result.image_attr, expected_pixels, rtol=1e-4, atol=1e-7 * float(expected.abs().max()))


# --------------------------------------------------------------------------------- batching, generation, state


@pytest.mark.parametrize("make", [gpt2, bart], ids=["gpt2", "bart"])
def test_a_padded_batch_equals_one_prompt_at_a_time(tokenizer, make):
    model = make()
    chefer = CheferLLMAttribution(model, tokenizer)
    prompts = ["the patient has fever", "patient denies chest pain and reports mild cough with fever", "a cough"]
    targets = ["and cough", "no fever", "with severe left chest pain"]
    inps = [TextTokenInput(p, tokenizer) for p in prompts]
    together = chefer.attribute_batch(inps, targets, chunk_size=3, batch_size=None)
    for inp, target, batched in zip(inps, targets, together, strict=True):
        alone = chefer.attribute(inp, target=target)
        assert batched.input_tokens == alone.input_tokens and batched.output_tokens == alone.output_tokens
        assert_matches(batched.token_attr, alone.token_attr)
        torch.testing.assert_close(batched.output_probs, alone.output_probs, rtol=1e-4, atol=1e-6)


def test_a_batch_of_images_equals_one_image_at_a_time(tokenizer):
    model = vit_gpt2()
    chefer = CheferLLMAttribution(model, tokenizer)
    torch.manual_seed(2)
    images = [torch.randn(3, 16, 16) for _ in range(2)]
    targets = ["left chest pain", "no"]
    together = chefer.attribute_batch(images, targets, batch_size=None)
    for image, target, batched in zip(images, targets, together, strict=True):
        alone = chefer.attribute(image, target=target)
        assert_matches(batched.token_attr, alone.token_attr)
        torch.testing.assert_close(batched.image_attr, alone.image_attr, rtol=1e-4, atol=1e-9)


def test_generated_target_is_the_greedy_output(tokenizer):
    model = gpt2()
    inp = TextTokenInput("the patient has", tokenizer)
    result = CheferLLMAttribution(model, tokenizer).attribute(inp, gen_args={"max_new_tokens": 4, "do_sample": False})
    with torch.no_grad():
        ids = inp.inp_tensor
        greedy = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )[0, ids.shape[1]:]
    assert result.output_tokens == tokenizer.convert_ids_to_tokens(greedy.tolist())
    assert_matches(result.token_attr, reference_decoder_only(model, ids[0], greedy))


def test_encoder_decoder_generation_drops_the_decoder_start_token(tokenizer):
    model = bart()
    inp = TextTokenInput("patient reports chest pain", tokenizer)
    result = CheferLLMAttribution(model, tokenizer).attribute(inp, gen_args={"max_new_tokens": 3, "min_new_tokens": 3})
    with torch.no_grad():
        ids = inp.inp_tensor
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3)[0]
    assert int(generated[0]) == model.config.decoder_start_token_id
    assert result.output_tokens == tokenizer.convert_ids_to_tokens(generated[1:].tolist())
    assert_matches(result.token_attr, reference_encoder_decoder(model, generated[1:], input_ids=ids))


def test_output_probs_are_the_model_probabilities(tokenizer):
    model = gpt2()
    inp = TextTokenInput("the patient has", tokenizer)
    target = torch.tensor(tokenizer.encode("fever and cough", add_special_tokens=False))
    result = CheferLLMAttribution(model, tokenizer).attribute(inp, target=target)
    with torch.no_grad():
        logits = model(torch.cat([inp.inp_tensor[0], target]).unsqueeze(0)).logits[0, 3:6]
    torch.testing.assert_close(result.output_probs, logits.softmax(-1)[torch.arange(3), target])


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        model.config._attn_implementation,
        [sorted(vars(m)) for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    )


@pytest.mark.parametrize("make", [gpt2, bart, vit_gpt2], ids=["gpt2", "bart", "vit-gpt2"])
def test_sdpa_models_work_and_are_left_as_found(tokenizer, make):
    model = make().train()  # SDPA by default, and in training mode: both must come back
    assert model.config._attn_implementation == "sdpa"
    before = _state(model)
    chefer = CheferLLMAttribution(model, tokenizer)
    if make is vit_gpt2:
        torch.manual_seed(3)
        pixels = torch.randn(3, 16, 16)
        target = torch.tensor(tokenizer.encode("chest pain", add_special_tokens=False))
        result = chefer.attribute(pixels, target=target)
        expected = reference_encoder_decoder(model.eval(), target, pixel_values=pixels.unsqueeze(0))
        model.train()
    else:
        inp = TextTokenInput("patient has chest pain", tokenizer)
        target = torch.tensor(tokenizer.encode("and fever", add_special_tokens=False))
        result = chefer.attribute(inp, target=target)
        if make is gpt2:
            expected = reference_decoder_only(model.eval(), inp.inp_tensor[0], target)
        else:
            expected = reference_encoder_decoder(model.eval(), target, input_ids=inp.inp_tensor)
        model.train()
    assert_matches(result.token_attr, expected)
    after = _state(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


# --------------------------------------------------------------------------------- Captum's format and errors


def test_same_format_as_captums_llm_gradient_attribution(tokenizer):
    model = gpt2()
    inp = TextTokenInput("the patient has fever", tokenizer, skip_tokens=["<s>"])
    ours = CheferLLMAttribution(model, tokenizer).attribute(inp, target="and cough")
    theirs = LLMGradientAttribution(LayerIntegratedGradients(model, model.transformer.wte), tokenizer).attribute(
        inp, target="and cough", n_steps=4)
    assert ours.input_tokens == theirs.input_tokens and ours.output_tokens == theirs.output_tokens
    assert ours.token_attr.shape == theirs.token_attr.shape and ours.seq_attr.shape == theirs.seq_attr.shape


def test_plots_render(tokenizer):
    import matplotlib.pyplot as plt

    result = CheferLLMAttribution(gpt2(), tokenizer).attribute(
        TextTokenInput("the patient has fever", tokenizer), target="and cough"
    )
    image = CheferLLMAttribution(vit_gpt2(), tokenizer).attribute(torch.randn(3, 16, 16), target="chest pain")
    for fig, _ in (result.plot_token_attr(show=False), result.plot_seq_attr(show=False),
                   image.plot_token_attr(show=False), image.plot_image_attr(1, show=False)):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        assert buffer.tell() > 1000
        plt.close(fig)


@pytest.mark.parametrize("name", ["GPT2Model", "BartModel"])
def test_a_model_without_a_language_model_head_is_refused(tokenizer, name):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4) if name == "GPT2Model" else \
        transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                                decoder_ffn_dim=32)
    model = getattr(transformers, name)(config)
    with pytest.raises(TypeError, match=r"no language-model head.*AutoModelFor"):
        CheferLLMAttribution(model, tokenizer)


def test_half_precision_models_give_float32_relevance_close_to_float32_models(tokenizer):
    model = gpt2()
    inp = TextTokenInput("the patient has fever", tokenizer)
    full = CheferLLMAttribution(model, tokenizer).attribute(inp, target="and cough")
    half = CheferLLMAttribution(copy.deepcopy(model).to(torch.bfloat16), tokenizer).attribute(inp, target="and cough")
    assert half.token_attr.dtype == torch.float32
    torch.testing.assert_close(
        half.token_attr, full.token_attr, rtol=0.1, atol=0.05 * float(full.token_attr.abs().max())
    )


def test_other_misuse_is_refused_with_the_fix(tokenizer):
    with pytest.raises(TypeError, match="HuggingFace transformers model"):
        CheferLLMAttribution(nn.Linear(2, 2), tokenizer)
    chefer = CheferLLMAttribution(gpt2(layers=1), tokenizer)
    inp = TextTokenInput("the patient", tokenizer)
    with pytest.raises(TypeError, match="TextTokenInput"):
        chefer.attribute("the patient", target="has")
    with pytest.raises(ValueError, match="gen_args only applies"):
        chefer.attribute(inp, target="has", gen_args={"max_new_tokens": 2})
    with pytest.raises(ValueError, match="target is empty"):
        chefer.attribute(inp, target="")
    with pytest.raises(ValueError, match="gradient_target"):
        chefer.attribute(inp, target="has", gradient_target="probability")
    with pytest.raises(ValueError, match="one target per prompt"):
        chefer.attribute_batch([inp, inp], ["has"])
    with pytest.raises(TypeError, match="pixel values"):
        CheferLLMAttribution(vit_gpt2(), tokenizer).attribute(inp, target="has")


# --------------------------------------------------------------------------------- layers, chunks, dtypes


def _detached_output(module, args, output):
    return (output[0].detach(), *output[1:])


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_a_layer_no_gradient_reaches_adds_nothing(tokenizer, chunk_size):
    """The middle layer's attention output is cut from the graph: its map gets no gradient and adds nothing."""
    model = gpt2()
    handle = model.transformer.h[1].attn.register_forward_hook(_detached_output)
    try:
        inp = TextTokenInput("the patient has fever", tokenizer)
        target = torch.tensor(tokenizer.encode("and mild cough", add_special_tokens=False))
        result = CheferLLMAttribution(model, tokenizer).attribute(inp, target=target, chunk_size=chunk_size)
        expected = reference_decoder_only(model, inp.inp_tensor[0], target)  # skips the layer without a gradient
    finally:
        handle.remove()
    assert_matches(result.token_attr, expected)
    assert not torch.allclose(expected, reference_decoder_only(model, inp.inp_tensor[0], target), rtol=1e-2)


def test_one_layer_and_one_head_one_token_per_backward_pass_in_a_batch(tokenizer):
    model = gpt2(layers=1, heads=1)
    chefer = CheferLLMAttribution(model, tokenizer)
    inps = [TextTokenInput("the patient has fever", tokenizer), TextTokenInput("a cough", tokenizer)]
    targets = [torch.tensor(tokenizer.encode(t, add_special_tokens=False)) for t in ("and mild cough", "with pain")]
    together = chefer.attribute_batch(inps, targets, chunk_size=1, batch_size=None)
    for inp, target, result in zip(inps, targets, together, strict=True):
        assert_matches(result.token_attr, reference_decoder_only(model, inp.inp_tensor[0], target))


def test_a_double_precision_model_gives_double_precision_relevance(tokenizer):
    model = gpt2()
    inp = TextTokenInput("the patient has fever", tokenizer)
    single = CheferLLMAttribution(model, tokenizer).attribute(inp, target="and cough")
    double = CheferLLMAttribution(copy.deepcopy(model).double(), tokenizer).attribute(inp, target="and cough")
    assert double.token_attr.dtype == torch.float64
    assert_matches(double.token_attr.float(), single.token_attr)


def test_chunk_size_is_the_number_of_output_tokens_per_backward_pass(tokenizer, monkeypatch):
    grad = torch.autograd.grad
    calls = []

    def counting(outputs, inputs, grad_outputs=None, **kwargs):
        calls.append(None if grad_outputs is None else grad_outputs.shape[0])
        return grad(outputs, inputs, grad_outputs=grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    chefer = CheferLLMAttribution(gpt2(layers=1), tokenizer)
    inp = TextTokenInput("the patient has fever", tokenizer)
    target = "mild chest pain with cough"  # five tokens
    for chunk_size, expected in ((2, [2, 2, 1]), (None, [5]), (16, [5]), (1, [None] * 5)):
        calls.clear()
        chefer.attribute(inp, target=target, chunk_size=chunk_size)
        assert calls == expected, chunk_size


def test_logits_are_asked_for_the_positions_that_predict_the_output_only(tokenizer):
    model = gpt2(layers=1)
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    try:
        chefer = CheferLLMAttribution(model, tokenizer)
        chefer.attribute(TextTokenInput("the patient has fever", tokenizer), target="and cough")  # 5 + 2 positions
        chefer.attribute_batch([TextTokenInput("a", tokenizer), TextTokenInput("the patient has", tokenizer)],
                               ["cough", "mild fever"], batch_size=None)  # 2 + 1 and 4 + 2 positions
    finally:
        handle.remove()
    assert [kwargs["logits_to_keep"] for kwargs in seen] == [3, 5]  # from the last prompt position of the shortest
    assert [tuple(kwargs["input_ids"].shape) for kwargs in seen] == [(1, 7), (2, 6)]
    assert seen[1]["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]


def test_a_layer_whose_cross_attention_is_not_captured_adds_no_cross_term(tokenizer):
    model = bart()
    chefer = CheferLLMAttribution(model, tokenizer)
    chefer._cross_modules = chefer._cross_modules[1:]  # as if the first decoder layer had no cross-attention
    inp = TextTokenInput("patient reports severe chest pain", tokenizer)
    target = torch.tensor(tokenizer.encode("chest pain cough", add_special_tokens=False))
    result = chefer.attribute(inp, target=target)
    assert_matches(
        result.token_attr, reference_encoder_decoder(model, target, without_cross=(0,), input_ids=inp.inp_tensor)
    )


def test_modules_read_in_the_wrong_roles_are_refused(tokenizer):
    inp = TextTokenInput("patient reports chest pain", tokenizer)
    swapped = CheferLLMAttribution(bart(), tokenizer)
    swapped._self_modules, swapped._cross_modules = swapped._cross_modules, swapped._self_modules
    with pytest.raises(RuntimeError) as raised:
        swapped.attribute(inp, target="cough")
    assert str(raised.value) == ("BartForConditionalGeneration: a cross-attention call came before its layer's "
                                 "self-attention call; the decoder's layers are not in the order this class reads them")
    blind = CheferLLMAttribution(gpt2(layers=1), tokenizer)
    blind._self_modules = []
    with pytest.raises(RuntimeError) as raised:
        blind.attribute(inp, target="cough")
    assert str(raised.value) == "GPT2LMHeadModel: no decoder self-attention was recorded in the forward pass"


# --------------------------------------------------------------------------------- generation


def test_the_default_generation_is_captums_greedy_25_tokens(tokenizer):
    model = gpt2(layers=1)
    model.generation_config.eos_token_id = None  # nothing stops it early
    inp = TextTokenInput("the patient has", tokenizer)
    result = CheferLLMAttribution(model, tokenizer).attribute(inp, chunk_size=None)
    ids = inp.inp_tensor
    with torch.no_grad():
        greedy = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=25, do_sample=False
        )[0, ids.shape[1]:]
    assert len(result.output_tokens) == 25
    assert result.output_tokens == tokenizer.convert_ids_to_tokens(greedy.tolist())


def test_generation_returning_a_dict_reads_its_sequences(tokenizer):
    model = gpt2(layers=1)
    inp = TextTokenInput("the patient has", tokenizer)
    plain = CheferLLMAttribution(model, tokenizer).attribute(inp, gen_args={"max_new_tokens": 3, "do_sample": False})
    as_dict = CheferLLMAttribution(model, tokenizer).attribute(
        inp, gen_args={"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "output_scores": True})
    assert len(plain.output_tokens) == 3 and as_dict.output_tokens == plain.output_tokens
    assert torch.equal(as_dict.token_attr, plain.token_attr)


def test_generation_reads_every_prompt_token_as_real(tokenizer):
    """A prompt that holds the pad id: the explanation reads it as a token, so generation must too."""
    model = gpt2()
    inp = TextTokenInput("the patient <pad> has fever", tokenizer)
    ids = inp.inp_tensor
    assert int(ids[0, 3]) == model.config.pad_token_id
    options = {"max_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        real = model.generate(ids, attention_mask=torch.ones_like(ids), **options)[0, ids.shape[1]:]
        masked = model.generate(ids, **options)[0, ids.shape[1]:]  # transformers would mask the pad id
    assert not torch.equal(real, masked), "a case where the mask changes the output"
    result = CheferLLMAttribution(model, tokenizer).attribute(inp, gen_args=options)
    assert result.output_tokens == tokenizer.convert_ids_to_tokens(real.tolist())


def test_generation_runs_without_dropout_and_leaves_the_model_training(tokenizer):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     initializer_range=0.3, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5, **IDS)
    model = transformers.GPT2LMHeadModel(config).eval()
    inp = TextTokenInput("the patient has", tokenizer)
    options = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        greedy = model.generate(inp.inp_tensor, attention_mask=torch.ones_like(inp.inp_tensor), **options)[0, 4:]
    result = CheferLLMAttribution(model.train(), tokenizer).attribute(inp, gen_args=options)
    assert result.output_tokens == tokenizer.convert_ids_to_tokens(greedy.tolist())
    assert all(m.training for m in model.modules())


def test_an_image_to_text_model_generates_from_the_image(tokenizer):
    model = vit_gpt2()
    torch.manual_seed(4)
    pixels = torch.randn(3, 16, 16)
    options = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    result = CheferLLMAttribution(model, tokenizer).attribute(pixels, gen_args=options)
    with torch.no_grad():
        generated = model.generate(pixel_values=pixels[None], **options)[0]
    assert int(generated[0]) == model.config.decoder_start_token_id
    assert result.output_tokens == tokenizer.convert_ids_to_tokens(generated[1:].tolist())


def test_the_decoder_starts_from_the_generation_configs_start_token(tokenizer):
    """``generate`` starts the decoder from ``generation_config``; the explained forward pass does too."""
    model = bart()
    model.generation_config.decoder_start_token_id = 1  # the model config says 2
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["decoder_input_ids"]),
                                             with_kwargs=True)
    try:
        CheferLLMAttribution(model, tokenizer).attribute(
            TextTokenInput("patient reports pain", tokenizer), target="chest pain"
        )
    finally:
        handle.remove()
    assert seen[0].tolist() == [[1, tokenizer.convert_tokens_to_ids("chest")]]


# --------------------------------------------------------------------------------- results


def test_a_text_result_links_its_input_and_an_image_result_its_probabilities(tokenizer):
    inp = TextTokenInput("the patient has", tokenizer)
    assert CheferLLMAttribution(gpt2(layers=1), tokenizer).attribute(inp, target="fever").inp is inp
    model = vit_gpt2()
    torch.manual_seed(5)
    pixels = torch.randn(3, 16, 16)
    target = torch.tensor(tokenizer.encode("chest pain", add_special_tokens=False))
    result = CheferLLMAttribution(model, tokenizer).attribute(pixels, target=target)
    with torch.no_grad():
        start = torch.tensor([[model.config.decoder_start_token_id]])
        logits = model(pixel_values=pixels[None], decoder_input_ids=torch.cat([start, target[None, :-1]], 1)).logits[0]
    torch.testing.assert_close(result.output_probs, logits.softmax(-1)[torch.arange(2), target])


def test_image_results_need_one_relevance_image_per_output_token():
    with pytest.raises(ValueError) as raised:
        LLMImageAttributionResult(input_tokens=["[CLS]"], output_tokens=["a", "b"], seq_attr=torch.zeros(1),
                                  token_attr=torch.zeros(2, 1), image_attr=torch.zeros(2, 16, 16))
    assert str(raised.value) == "image_attr must be [n_output, C, H, W] with n_output = 2; got (2, 16, 16)"
    with pytest.raises(ValueError, match=r"with n_output = 2; got \(3, 3, 16, 16\)$"):
        LLMImageAttributionResult(input_tokens=["[CLS]"], output_tokens=["a", "b"], seq_attr=torch.zeros(1),
                                  token_attr=torch.zeros(2, 1), image_attr=torch.zeros(3, 3, 16, 16))


def test_the_image_heatmap(tokenizer):
    import matplotlib.pyplot as plt

    torch.manual_seed(6)
    result = CheferLLMAttribution(vit_gpt2(), tokenizer).attribute(torch.randn(3, 16, 16), target="chest pain")
    with matplotlib.rc_context({"image.cmap": "gray"}):  # a user's default colormap does not change it
        fig, ax = result.plot_image_attr(show=False)
    try:
        (image,) = ax.images
        assert ax.get_title() == "relevance for output token 0: 'chest'"
        torch.testing.assert_close(torch.as_tensor(image.get_array().data), result.image_attr[0].sum(0))
        assert image.get_cmap().name == "viridis"
        assert image.colorbar is not None and image.colorbar.ax in fig.axes
    finally:
        plt.close(fig)


@pytest.mark.parametrize("encoder, extra, names", [
    (transformers.DeiTConfig, 2, ["[token 0]", "[token 1]", "patch 0,0"]),  # a class and a distillation token
    (transformers.ViTConfig, 1, ["[CLS]", "patch 0,0", "patch 0,1"]),
])
def test_tokens_before_the_patches_and_patch_sizes_as_pairs(tokenizer, encoder, extra, names):
    model = vit_gpt2(encoder=encoder, patch_size=(4, 4))
    torch.manual_seed(7)
    pixels = torch.randn(3, 16, 16)
    target = torch.tensor(tokenizer.encode("left chest pain", add_special_tokens=False))
    result = CheferLLMAttribution(model, tokenizer).attribute(pixels, target=target)
    expected = reference_encoder_decoder(model, target, pixel_values=pixels.unsqueeze(0))
    assert result.input_tokens[:3] == names and len(result.input_tokens) == extra + 16
    assert_matches(result.token_attr, expected)
    patch = expected[:, extra:].reshape(3, 4, 4)
    spread = (patch / 48).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand(3, 3, 16, 16)
    torch.testing.assert_close(result.image_attr, spread, rtol=1e-4, atol=1e-7 * float(expected.abs().max()))


def test_an_image_encoder_without_a_class_token(tokenizer):
    model = vit_gpt2(encoder=transformers.SiglipVisionConfig)
    chefer = CheferLLMAttribution(model, tokenizer)
    # SigLIP's pooling head (which the decoder does not read) is an attention module too: leave it out
    chefer._encoder_modules = [m for m in chefer._encoder_modules if not isinstance(m, nn.MultiheadAttention)]
    torch.manual_seed(8)
    pixels = torch.randn(3, 16, 16)
    target = torch.tensor(tokenizer.encode("chest pain", add_special_tokens=False))
    result = chefer.attribute(pixels, target=target)
    assert result.input_tokens[:2] == ["patch 0,0", "patch 0,1"] and len(result.input_tokens) == 16
    assert_matches(result.token_attr, reference_encoder_decoder(model, target, pixel_values=pixels.unsqueeze(0)))


def test_image_models_whose_patches_cannot_be_placed_are_refused(tokenizer):
    model = vit_gpt2()
    model.encoder.config.patch_size = 2  # 64 patches, but the encoder gives 17 tokens
    with pytest.raises(ValueError) as raised:
        CheferLLMAttribution(model, tokenizer).attribute(torch.randn(3, 16, 16), target="pain")
    assert str(raised.value) == "the encoder has 17 tokens, fewer than the 8x8 patches of the image"
    vars(model.encoder.config)["patch_size"] = None  # an encoder without patches (past the config's own checks)
    with pytest.raises(TypeError) as raised:
        CheferLLMAttribution(model, tokenizer).attribute(torch.randn(3, 16, 16), target="pain")
    assert str(raised.value) == "ViTModel has no patch_size in its config: cannot place patches"
