"""What ``CheferLLMAttribution`` accepts, refuses and warns about, and the text helpers behind string targets.

Each refusal is checked word for word: a message names the problem and the fix, so a message that lost a
word, or named ``NoneType`` instead of the model, is a regression. The tokenization helpers are checked on
hand-made cases whose answers follow from the rules their docstrings state (a space between words, none
before punctuation or inside scripts written without spaces, ...). Models are tiny and random.
"""

from __future__ import annotations

import os
import sys
import types
import warnings

import pytest
import torch
from captum.attr import TextTokenInput
from torch import nn

import captum_chefer
from captum_chefer import CheferLLMAttribution
from captum_chefer.llm import (
    OutOfVocabularyWarning,
    _check_shapes,
    _check_vocabulary,
    _decode,
    _is_cross_attention,
    _joiner,
    _pretty_tokens,
    _same_vocabulary,
    _unknown_words,
    _unspaced,
    _vocabulary_size,
    _warn_unknown_prompt,
    _warn_unknown_words,
    word_tokenizer,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PACKAGE = os.path.dirname(os.path.abspath(captum_chefer.__file__))
WORDS = ["the", "patient", "reports", "fever", "and", "a", "dry", "cough", ",", "(", ")", "chest", "pain"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def gpt2(vocab: int, layers: int = 1) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=layers, n_head=2,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()


def bart(vocab: int) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32,
        decoder_start_token_id=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, forced_bos_token_id=None,
        forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(config).eval()


def vit_gpt2(vocab: int) -> nn.Module:
    torch.manual_seed(0)
    vit = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16)
    decoder = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    return transformers.VisionEncoderDecoderModel(config=config).eval()


def refused(error: type, message: str, call, *args, **kwargs) -> None:
    """``call(...)`` raises ``error`` whose message is exactly ``message``."""
    with pytest.raises(error) as raised:
        call(*args, **kwargs)
    assert str(raised.value.args[0]) == message


@pytest.fixture(scope="module")
def chefer(tokenizer):
    return CheferLLMAttribution(gpt2(len(tokenizer)), tokenizer)


# ---------------------------------------------------------------------------------------------- models


class _LinearHead(nn.Module):
    """Something with a config and an output embedding, but no attention: a language model in shape only."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head


class _NotAModule:
    config = types.SimpleNamespace()

    def get_output_embeddings(self) -> nn.Module:
        return nn.Linear(2, 2)


class _ConfigOnly(nn.Module):
    config = types.SimpleNamespace()


def test_objects_that_are_not_language_models_are_refused(tokenizer):
    for model in (_NotAModule(), _ConfigOnly(), nn.Linear(2, 2)):
        refused(TypeError, f"CheferLLMAttribution needs a HuggingFace transformers model with a language-model head, "
                f"got {type(model).__name__}; for other models use CheferAttribution with an adapter",
                CheferLLMAttribution, model, tokenizer)
    body = transformers.GPT2Model(transformers.GPT2Config(vocab_size=8, n_embd=8, n_layer=1, n_head=2))
    refused(TypeError, "GPT2Model has no language-model head (get_output_embeddings() is None), so it has no "
            "logits over the vocabulary to explain; load the model with its generation head instead, e.g. "
            "AutoModelForCausalLM / GPT2LMHeadModel or AutoModelForSeq2SeqLM / BartForConditionalGeneration",
            CheferLLMAttribution, body, tokenizer)


def test_a_model_without_capturable_attention_is_refused(tokenizer):
    """A config without ``is_encoder_decoder`` reads as decoder-only; its decoder is the whole model."""
    refused(TypeError, "_LinearHead: no attention module that this package can capture was found in its decoder; "
            "supported are transformers attention modules that dispatch through AttentionInterface (models with an "
            "eager_attention_forward)", CheferLLMAttribution, _LinearHead(types.SimpleNamespace()), tokenizer)


class _SelfAttentionOnly(transformers.GPT2LMHeadModel):
    """Claims to be an encoder-decoder, but its "decoder" has self-attention only."""

    def get_encoder(self):
        return self.transformer

    def get_decoder(self):
        return self.transformer


def test_an_encoder_decoder_without_cross_attention_is_refused(tokenizer):
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=8, n_layer=1, n_head=2)
    config.is_encoder_decoder = True
    refused(TypeError, "_SelfAttentionOnly is an encoder-decoder, but no cross-attention module was recognised in its "
            "decoder (one with is_causal=False or is_cross_attention=True)",
            CheferLLMAttribution, _SelfAttentionOnly(config), tokenizer)


class _Wrapped(nn.Module):
    """A BART behind a plain ``nn.Module``: no ``main_input_name``, ``device`` or ``generation_config``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def get_encoder(self) -> nn.Module:
        return self.inner.get_encoder()

    def get_decoder(self) -> nn.Module:
        return self.inner.get_decoder()

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_a_wrapped_encoder_decoder_reads_text_and_explains_as_the_model_itself(tokenizer):
    model = bart(len(tokenizer))
    wrapped = _Wrapped(model)
    assert not hasattr(wrapped, "main_input_name") and not hasattr(wrapped, "generation_config")
    inp = TextTokenInput("the patient reports fever", tokenizer)
    expected = CheferLLMAttribution(model, tokenizer).attribute(inp, target="dry cough")
    result = CheferLLMAttribution(wrapped, tokenizer).attribute(inp, target="dry cough")
    assert CheferLLMAttribution(wrapped, tokenizer).family == "encoder-decoder"
    assert result.output_tokens == ["dry", "cough"] and float(expected.token_attr.abs().max()) > 0
    torch.testing.assert_close(result.token_attr, expected.token_attr)
    wrapped.main_input_name = "input_features"  # a speech model, say
    refused(TypeError, "_Wrapped reads 'input_features'; CheferLLMAttribution supports encoder-decoders that read text "
            "(input_ids) or images (pixel_values)", CheferLLMAttribution, wrapped, tokenizer)


def test_the_family_is_read_from_the_configuration(tokenizer):
    assert CheferLLMAttribution(gpt2(len(tokenizer)), tokenizer).family == "decoder-only"
    assert CheferLLMAttribution(bart(len(tokenizer)), tokenizer).family == "encoder-decoder"
    assert CheferLLMAttribution(vit_gpt2(len(tokenizer)), tokenizer).family == "image-to-text"


def test_the_method_describes_itself_as_captum_expects(tokenizer):
    model = gpt2(len(tokenizer))
    chefer = CheferLLMAttribution(model, tokenizer)
    assert chefer.forward_func is model
    assert chefer.get_name() == "Chefer" and CheferLLMAttribution.get_name() == "Chefer"
    assert chefer.has_convergence_delta() is False


def test_an_encoder_decoder_without_a_decoder_start_token_is_refused(tokenizer):
    model = vit_gpt2(len(tokenizer))
    del model.config.decoder_start_token_id  # neither it nor the generation config names one now
    model.generation_config.decoder_start_token_id = None
    refused(ValueError, "VisionEncoderDecoderModel has no decoder_start_token_id; "
            "set model.config.decoder_start_token_id (the token the decoder starts from, e.g. the tokenizer's BOS "
            "or CLS id)",
            CheferLLMAttribution(model, tokenizer).attribute, torch.zeros(3, 8, 8), target="fever")


# ---------------------------------------------------------------------------------------------- prompts


def test_prompts_of_the_wrong_kind_are_refused(tokenizer, chefer):
    refused(TypeError, "GPT2LMHeadModel reads text: pass captum.attr.TextTokenInput(prompt, tokenizer), not str",
            chefer.attribute, "the patient", target="fever")
    image_model = CheferLLMAttribution(vit_gpt2(len(tokenizer)), tokenizer)
    refused(TypeError, "VisionEncoderDecoderModel reads an image: pass its pixel values [C, H, W] "
            "(from the image processor) as the input, not TextTokenInput",
            image_model.attribute, TextTokenInput("the", tokenizer), target="fever")
    refused(ValueError, "pass one image's pixel values [C, H, W] (or [1, C, H, W]); got (2, 3, 8, 8)",
            image_model.attribute, torch.zeros(2, 3, 8, 8), target="fever")
    refused(ValueError, "pass one image's pixel values [C, H, W] (or [1, C, H, W]); got (8, 8)",
            image_model.attribute, torch.zeros(8, 8), target="fever")


def test_one_image_with_a_batch_dimension_is_that_image(tokenizer):
    model = CheferLLMAttribution(vit_gpt2(len(tokenizer)), tokenizer)
    torch.manual_seed(1)
    image = torch.randn(3, 8, 8)
    alone = model.attribute(image, target="fever and cough")
    batched = model.attribute(image[None], target="fever and cough")
    assert float(alone.token_attr.abs().max()) > 0
    assert torch.equal(alone.token_attr, batched.token_attr) and torch.equal(alone.image_attr, batched.image_attr)


def test_pixels_are_cast_to_the_models_dtype(tokenizer):
    model = vit_gpt2(len(tokenizer))
    torch.manual_seed(1)
    image = torch.randn(3, 8, 8)  # float32, as an image processor makes it
    single = CheferLLMAttribution(model, tokenizer).attribute(image, target="fever")
    double = CheferLLMAttribution(model.double(), tokenizer).attribute(image, target="fever")
    assert double.token_attr.dtype == torch.float64
    torch.testing.assert_close(double.token_attr, single.token_attr.double(), rtol=1e-3, atol=1e-6)


def test_a_prompt_from_another_tokenizer_or_without_tokens_is_refused(tokenizer, chefer):
    other = word_tokenizer(["fever", "the", "patient"])
    refused(ValueError, "the prompt was tokenized by another tokenizer than the one CheferLLMAttribution was given "
            "(their vocabularies differ), so the model would read other tokens than the prompt shows; make the "
            "TextTokenInput with the same tokenizer",
            chefer.attribute, TextTokenInput("the patient", other), target="fever")
    no_bos = word_tokenizer(WORDS, bos=False)
    refused(ValueError, "the prompt has no tokens (an empty text, and the tokenizer adds no special token); "
            "give a prompt of at least one token",
            CheferLLMAttribution(gpt2(len(no_bos)), no_bos).attribute, TextTokenInput("", no_bos), target="fever")


def test_a_prompt_of_one_token_is_explained(tokenizer, chefer):
    result = chefer.attribute(TextTokenInput("", tokenizer), target="fever cough")  # <s> alone
    assert result.input_tokens == ["<s>"] and tuple(result.token_attr.shape) == (2, 1)


def test_ids_outside_the_models_vocabulary_are_refused(tokenizer):
    small = CheferLLMAttribution(gpt2(8), tokenizer)  # the tokenizer knows more words than the model
    refused(ValueError, "the prompt holds token id 9, outside the model's vocabulary of 8 tokens (ids 0..7); use the "
            "model's own tokenizer", small.attribute, TextTokenInput("the a", tokenizer), target=[4])
    refused(ValueError, "the target holds token id 8, outside the model's vocabulary of 8 tokens (ids 0..7); use the "
            "model's own tokenizer", small.attribute, TextTokenInput("the", tokenizer), target=[4, 8])


def test_the_vocabulary_check(tokenizer):
    _check_vocabulary("prompt", torch.tensor([0, 4]), None)  # no known size: nothing to check
    _check_vocabulary("prompt", torch.tensor([], dtype=torch.long), 5)  # nothing to check
    _check_vocabulary("prompt", torch.tensor([0, 4]), 5)  # the first and the last id
    refused(ValueError, "the prompt holds token id 5, outside the model's vocabulary of 5 tokens (ids 0..4); use the "
            "model's own tokenizer", _check_vocabulary, "prompt", torch.tensor([0, 5]), 5)
    refused(ValueError, "the target holds token id -1, outside the model's vocabulary of 5 tokens (ids 0..4); use the "
            "model's own tokenizer", _check_vocabulary, "target", torch.tensor([-1, 3]), 5)
    refused(ValueError, "the target holds token id 7, outside the model's vocabulary of 5 tokens (ids 0..4); use the "
            "model's own tokenizer", _check_vocabulary, "target", torch.tensor([7]), 5)
    assert _vocabulary_size(nn.Embedding(7, 2)) == 7 and _vocabulary_size(nn.Linear(2, 9)) == 9
    assert _vocabulary_size(nn.Identity()) is None


# ---------------------------------------------------------------------------------------------- targets


def test_targets_as_ids(tokenizer, chefer):
    inp = TextTokenInput("the patient reports", tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["fever", "and"])
    as_list = chefer.attribute(inp, target=ids)
    assert as_list.output_tokens == ["fever", "and"] and float(as_list.token_attr.abs().max()) > 0
    for same in (torch.tensor(ids), torch.tensor([ids])):  # 1-D, or one row
        assert torch.equal(chefer.attribute(inp, target=same).token_attr, as_list.token_attr)
    one = chefer.attribute(inp, target=torch.tensor(ids[:1]))  # a single token stays a sequence of one
    assert one.output_tokens == ["fever"] and torch.equal(one.token_attr, as_list.token_attr[:1])


def test_targets_that_are_not_token_ids_are_refused(tokenizer, chefer):
    inp = TextTokenInput("the patient", tokenizer)
    refused(TypeError, "target must be a string, token ids (tensor or list of ints) or None; got list",
            chefer.attribute, inp, target=[4.0, 5.0])
    refused(TypeError, "target must be a string, token ids (tensor or list of ints) or None; got dict",
            chefer.attribute, inp, target={"fever": 4})
    refused(ValueError, "target token ids must be a 1-D integer tensor or list; got shape (2,)",
            chefer.attribute, inp, target=torch.tensor([4.0, 5.0]))
    refused(ValueError, "target token ids must be a 1-D integer tensor or list; got shape (2, 2)",
            chefer.attribute, inp, target=torch.tensor([[4, 5], [6, 7]]))
    refused(ValueError, "the target is empty: give at least one output token (or generate with max_new_tokens >= 1)",
            chefer.attribute, inp, target="")


# ---------------------------------------------------------------------------------------------- text helpers


@pytest.mark.parametrize("prompt, target, expected", [
    ("a fever", "and a cough", " "),
    ("a b", "c", " "),  # only the last character of the prompt counts
    ("fever", "a cough", " "),  # and only the first of the target
    ("a fever ", "and", ""),  # the prompt brings the space
    ("a fever", " and", ""),  # the target does
    ("", "and", ""),
    ("a fever", "", ""),
    ("a fever", ", and", ""),  # punctuation that attaches to the word before
    ("a fever", ". ", ""),
    ("a fever", "(mild)", " "),  # opening brackets and quotes take a space before them
    ("a fever", "\u201cmild\u201d", " "),
    ("\u60a3\u8005\u53d1\u70e7", "\u548c\u54b3\u55fd", ""),  # Chinese on both sides
    ("ab\u53d1", "\u548c", ""),  # only the characters at the join count
    ("\u53d1", "\u548ca", ""),
    ("\u53d1\u70e7", "and", " "),  # Chinese then English
    ("fever", "\u548c", " "),
    ("\u0e44\u0e02\u0e49", "\u0e41\u0e25\u0e30", ""),  # Thai
])
def test_what_joins_a_prompt_and_the_text_that_follows(prompt, target, expected):
    assert _joiner(prompt, target) == expected


@pytest.mark.parametrize("char, expected", [
    ("\u548c", True), ("\uff21", True),  # wide (CJK) and fullwidth
    ("\ud55c", False),  # Hangul is wide, but Korean puts spaces between words
    ("\U0002fffd", True),  # a wide code point without a name
    # Thai, Lao, Khmer, Myanmar, Tibetan
    ("\u0e01", True), ("\u0e81", True), ("\u1780", True), ("\u1000", True), ("\u0f40", True),
    ("a", False), ("\x00", False),  # a narrow character without a name
])
def test_scripts_written_without_spaces(char, expected):
    assert _unspaced(char) is expected


def test_tokenizers_are_the_same_when_their_vocabularies_are(tokenizer):
    copy_ = word_tokenizer(WORDS)
    other = word_tokenizer(WORDS[::-1])
    assert _same_vocabulary(tokenizer, tokenizer) and _same_vocabulary(tokenizer, copy_)
    assert not _same_vocabulary(tokenizer, other) and not _same_vocabulary(other, tokenizer)
    blind = object()  # cannot tell: assumed the same
    assert _same_vocabulary(blind, tokenizer) and _same_vocabulary(tokenizer, blind)
    assert _same_vocabulary(blind, object())


class _PlainDecoder:
    """A tokenizer whose ``decode`` takes the ids only."""

    def decode(self, ids):
        return "|".join(str(i) for i in ids)


def test_decoded_text_keeps_the_tokens_spaces_and_drops_special_tokens():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "fever": 1, ",": 2, "cough": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # " ," stays as the tokens have it
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    spaced = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    spaced.clean_up_tokenization_spaces = True  # its default for decode, which _decode overrides
    ids = spaced.encode("fever , cough")
    assert ids == [0, 1, 2, 3]
    assert _decode(spaced, ids) == "fever , cough"  # <s> dropped; no clean-up into "fever, cough"
    assert spaced.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True) == "fever, cough"
    assert _decode(_PlainDecoder(), (4, 5)) == "4|5"


def test_output_tokens_without_captums_pretty_names(tokenizer, monkeypatch):
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(["fever", "and"]))
    assert _pretty_tokens(ids, tokenizer) == ["fever", "and"]
    monkeypatch.setitem(sys.modules, "captum.attr._core.llm_attr", None)  # a Captum without them: import fails
    assert _pretty_tokens(ids, tokenizer) == ["fever", "and"]


class _Attention(nn.Module):
    def __init__(self, **flags) -> None:
        super().__init__()
        for name, value in flags.items():
            setattr(self, name, value)


class _CrossAttention(_Attention):
    pass


def test_cross_attention_is_told_apart_from_self_attention():
    assert _is_cross_attention(_Attention(is_cross_attention=True, is_causal=True))  # the flag decides
    assert not _is_cross_attention(_Attention(is_cross_attention=False, is_causal=False))
    assert _is_cross_attention(_CrossAttention(is_causal=True))  # then the name
    assert _is_cross_attention(_Attention(is_causal=False))  # then whether it is causal
    assert not _is_cross_attention(_Attention(is_causal=True))
    assert not _is_cross_attention(_Attention())  # a decoder's attention is causal unless it says otherwise


def test_captured_maps_of_the_wrong_shape_are_refused():
    def maps(encoder=(), self=(), cross=()):
        return {"encoder": list(encoder), "self": list(self), "cross": list(cross)}

    ok = torch.zeros(1, 2, 3, 3)
    _check_shapes(maps(self=[ok], cross=[None]), "decoder-only", 3, 3, "M")
    _check_shapes(maps([torch.zeros(1, 2, 4, 4)], [ok], [torch.zeros(1, 2, 3, 4)]), "encoder-decoder", 3, 4, "M")
    refused(RuntimeError, "M: no decoder self-attention was recorded in the forward pass",
            _check_shapes, maps(), "decoder-only", 3, 3, "M")
    refused(RuntimeError, "M: no cross-attention was recorded in the forward pass",
            _check_shapes, maps(self=[ok], cross=[None]), "encoder-decoder", 3, 4, "M")
    refused(RuntimeError, "M: self attention of layer 1 has shape (2, 3, 3), expected [B, H, 3, 3]",
            _check_shapes, maps(self=[ok, torch.zeros(2, 3, 3)], cross=[None, None]), "decoder-only", 3, 3, "M")
    refused(RuntimeError, "M: cross attention of layer 0 has shape (1, 2, 3, 5), expected [B, H, 3, 4]",
            _check_shapes, maps([torch.zeros(1, 2, 4, 4)], [ok], [torch.zeros(1, 2, 3, 5)]),
            "encoder-decoder", 3, 4, "M")
    refused(RuntimeError, "M: encoder attention of layer 0 has shape (1, 2, 4, 3), expected [B, H, 4, 4]",
            _check_shapes, maps([torch.zeros(1, 2, 4, 3)], [ok], [torch.zeros(1, 2, 3, 4)]),
            "encoder-decoder", 3, 4, "M")


# ---------------------------------------------------------------------------------------------- words it does not know


def test_unknown_words_are_found_once_each_in_order(tokenizer):
    unk = tokenizer.unk_token_id
    assert _unknown_words(tokenizer, "and a wet cough with wet sputum", unk) == ["wet", "with", "sputum"]
    assert _unknown_words(tokenizer, "fever <unk> cough", unk) == []  # the unknown token written out is known


def test_unknown_words_are_the_spans_the_tokenizer_cut():
    """A tokenizer that splits punctuation off: the unknown word is "wet", not the "wet," between spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1, ",": 2, "cough": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    split = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert split.convert_ids_to_tokens(split.encode("a wet, cough")) == ["a", "<unk>", ",", "cough"]
    assert _unknown_words(split, "a wet, cough", 0) == ["wet"]


class _SlowTokenizer:
    """A tokenizer without offsets (a "slow" one): words are looked up one at a time."""

    def __init__(self, known, error) -> None:
        self.known, self.error, self.unk_token = known, error, "<unk>"

    def __call__(self, *args, **kwargs):
        raise self.error("no offsets")

    def encode(self, text, add_special_tokens=False):
        return [self.known.get(word, 3) for word in text.split()]


@pytest.mark.parametrize("error", [TypeError, ValueError, KeyError, NotImplementedError])
def test_unknown_words_of_a_tokenizer_without_offsets(error):
    slow = _SlowTokenizer({"fever": 4, "cough": 5}, error)
    assert _unknown_words(slow, "fever wet cough wet <unk>", 3) == ["wet"]
    del slow.unk_token  # no name for its unknown token: every unknown word counts
    assert _unknown_words(slow, "fever wet cough wet <unk>", 3) == ["wet", "<unk>"]


def test_tokenizers_without_an_unknown_token_never_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unknown_words(object(), "fever", [3])
        _warn_unknown_prompt(object(), torch.tensor([3]), None)


def test_a_tokenizer_without_special_tokens_warns_of_unknown_prompt_words():
    bare = types.SimpleNamespace(unk_token_id=3, unk_token="?")  # no bos, eos, pad, ... ids at all
    with pytest.warns(OutOfVocabularyWarning,
                      match=r"^the prompt holds 1 word\(s\) .* unknown token '\?' \(token position\(s\) \[1\]\)"):
        _warn_unknown_prompt(bare, torch.tensor([4, 3]), None)


def test_the_warning_on_unknown_target_words(tokenizer):
    ids = tokenizer.encode("and a wet cough", add_special_tokens=False)
    with pytest.warns(OutOfVocabularyWarning) as record:
        _warn_unknown_words(tokenizer, "and a wet cough", ids)
    assert [str(w.message) for w in record] == [
        "the target's words ['wet'] are not in the tokenizer's vocabulary and become its unknown token '<unk>': the "
        "explanation is of that token, not of those words; use words the tokenizer knows, a tokenizer whose vocabulary "
        "has them, or pass token ids"]
    assert not record[0].filename.startswith(PACKAGE)  # points at the caller's line, not the package's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unknown_words(tokenizer, "and a dry cough", tokenizer.encode("and a dry cough", add_special_tokens=False))
        _warn_unknown_words(tokenizer, "wet", [4])  # ids given as they are: no unknown id, no warning
        _warn_unknown_words(word_tokenizer(WORDS), "fever <unk>", [4, 3])  # nothing but the unknown token itself


def test_the_warning_on_unknown_prompt_words(tokenizer):
    ids = torch.tensor(tokenizer.encode("the patient reports wet cough"))
    with pytest.warns(OutOfVocabularyWarning) as record:
        _warn_unknown_prompt(tokenizer, ids, None)
    assert [str(w.message) for w in record] == [
        "the prompt holds 1 word(s) the tokenizer does not know, read as its unknown token '<unk>' (token position(s) "
        "[4]): their relevance is the unknown token's; use words the tokenizer knows, or a tokenizer whose vocabulary "
        "has them"]
    assert not record[0].filename.startswith(PACKAGE)
    many = torch.tensor([tokenizer.unk_token_id] * 12)
    with pytest.warns(OutOfVocabularyWarning,
                      match=r"holds 12 word\(s\).*position\(s\) \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]\)"):
        _warn_unknown_prompt(tokenizer, many, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unknown_prompt(tokenizer, ids, [tokenizer.unk_token_id])  # dropped from the result by skip_tokens
        _warn_unknown_prompt(tokenizer, torch.tensor(tokenizer.encode("the patient")), None)
    with pytest.warns(OutOfVocabularyWarning):
        _warn_unknown_prompt(tokenizer, ids, [tokenizer.bos_token_id])


@pytest.mark.parametrize("name", ["bos", "eos", "pad", "sep", "cls", "mask"])
def test_an_unknown_token_that_is_also_a_special_token_does_not_warn(name):
    """GPT-2's unknown token is its <|endoftext|>: a prompt that holds it holds a special token, not a word."""
    special = word_tokenizer(WORDS)
    setattr(special, f"{name}_token", "<unk>")
    assert getattr(special, f"{name}_token_id") == special.unk_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unknown_prompt(special, torch.tensor([4, special.unk_token_id]), None)


def test_skipped_unknown_tokens_do_not_warn_in_an_attribution(tokenizer, chefer):
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfVocabularyWarning)
        result = chefer.attribute(TextTokenInput("the wet patient", tokenizer, skip_tokens=["<unk>"]), target="fever")
    assert result.input_tokens == ["<s>", "the", "patient"]


# ---------------------------------------------------------------------------------------------- word_tokenizer


def test_the_word_tokenizer():
    words = ["fever", "cough", "fever"]
    plain = word_tokenizer(words)
    assert len(plain) == 6
    assert plain.convert_ids_to_tokens(list(range(6))) == ["<pad>", "<s>", "</s>", "<unk>", "fever", "cough"]
    assert (plain.pad_token, plain.bos_token, plain.eos_token, plain.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (plain.pad_token_id, plain.bos_token_id, plain.eos_token_id, plain.unk_token_id) == (0, 1, 2, 3)
    assert plain.encode("fever and cough") == [1, 4, 3, 5]  # <s> first by default, unknown words as <unk>
    assert plain.encode("fever", add_special_tokens=False) == [4]
    assert word_tokenizer(words, bos=False).encode("fever cough") == [4, 5]
    assert word_tokenizer(words, eos=True).encode("fever cough") == [1, 4, 5, 2]
    assert word_tokenizer(words, bos=False, eos=True).encode("cough") == [5, 2]
    assert plain.decode([1, 4, 5], skip_special_tokens=True) == "fever cough"  # words joined by spaces
    pieces = word_tokenizer(["cough", "##s"])
    assert pieces.decode(pieces.convert_tokens_to_ids(["cough", "##s"])) == "coughs"  # a WordPiece continuation
