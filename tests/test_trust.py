"""No silently wrong explanation: each way a new user can get a wrong answer without a word is refused, warned
about, or gives the right result (checked against a reference made here).

Cases already covered by ``test_errors.py`` (PyHealth inputs: NaN, mixed batch sizes, out-of-range and
misshapen targets, empty batches in ``captum_inputs``, ...) are not repeated.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from captum.attr import IntegratedGradients, Saliency, TextTokenInput
from torch import nn

from captum_chefer import (
    CheferAttribution,
    CheferLLMAttribution,
    HuggingFaceAdapter,
    PyHealthAdapter,
    TransformerAdapter,
)
from captum_chefer.comparison import compare_methods, evaluate_methods, precision_at_k
from captum_chefer.llm import OutOfVocabularyWarning, word_tokenizer

transformers.logging.set_verbosity_error()

IDS = torch.tensor([[2, 7, 9, 3], [2, 8, 3, 0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])


def bert(num_labels: int = 3, **config) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=15, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, num_labels=num_labels, **config)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture
def adapter(seq_model):
    return PyHealthAdapter(seq_model)


def gpt2_for(tokenizer) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def byte_bpe():
    """A GPT-2 style tokenizer (byte-level BPE, no prefix space) trained here on a few sentences, in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sentences = ["the patient has a fever and a dry cough", "the patient reports a dry cough and a fever",
                 "no fever and no cough since monday", "a dry cough and chest pain", "the patient denies chest pain"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(sentences * 5, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------------- batches


def test_huggingface_encoding_with_unknown_keys_is_refused():
    adapter = HuggingFaceAdapter(bert())
    with pytest.raises(KeyError, match=r"keys \['mask'\] that HuggingFaceAdapter does not pass to "
                                       r"BertForSequenceClassification.*"
                                       r"reads \['input_ids', 'attention_mask', 'token_type_ids', 'labels'\].*"
                                       r"'mask' -> 'attention_mask'"):
        adapter.captum_inputs({"input_ids": IDS, "mask": MASK})
    with pytest.raises(KeyError, match=r"\['position_ids'\]"):
        adapter.captum_inputs({"input_ids": IDS, "attention_mask": MASK, "position_ids": MASK})
    # what a tokenizer returns beside the model's inputs is read as the plain encoding is
    plain = adapter.captum_inputs({"input_ids": IDS, "attention_mask": MASK}, level="token")
    extras = adapter.captum_inputs({"input_ids": IDS, "attention_mask": MASK, "special_tokens_mask": MASK,
                                    "length": torch.tensor([4, 3])}, level="token")
    assert all(torch.equal(a, b) for a, b in zip(plain[0] + plain[1], extras[0] + extras[1], strict=True))


def test_transformer_adapter_dict_batch_with_unknown_keys_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(KeyError, match=r"keys \['mask'\] that TransformerAdapter does not read.*'input', 'args'"):
        TransformerAdapter(model).captum_inputs({"input": torch.tensor([[1, 2, 3]]), "mask": torch.ones(1, 3)})


def test_a_mask_argument_the_adapter_was_not_told_of_warns():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids, mask):
            return self.head((self.embed(ids) * mask.unsqueeze(-1)).sum(1))

    ids, mask = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.warns(UserWarning, match="model argument 0 is shaped like the tokens.*pass mask_arg=0"):
        TransformerAdapter(Masked(), embedding=None).captum_inputs((ids, mask), level="token")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        told = TransformerAdapter(Masked(), mask_arg=0)
        told.captum_inputs((ids, mask), level="token")
        assert told.token_masks((mask,), (ids,))[0].tolist() == [[True, True, True], [True, True, False]]


def test_padding_ids_the_adapter_was_not_told_of_warn():
    class Padded(nn.Module):  # reads its padding from the ids, as the README's TransformerEncoder example does
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4, padding_idx=0)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            return self.head(self.embed(ids).sum(1))

    model = Padded()
    with pytest.warns(UserWarning,
                      match="the token ids hold 0, the padding_idx of the model's embedding.*pass pad_id=0"):
        TransformerAdapter(model, embedding=model.embed).captum_inputs(torch.tensor([[1, 2, 3], [4, 5, 0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        told = TransformerAdapter(model, embedding=model.embed, pad_id=0)
        tokens, args = told.captum_inputs(torch.tensor([[1, 2, 3], [4, 5, 0]]), level="token")
        assert told.token_masks(args, tokens)[0].tolist() == [[True, True, True], [True, True, False]]


def test_one_image_without_a_batch_dimension_is_refused():
    import torchvision

    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=16, num_classes=2).eval()
    with pytest.raises(ValueError,
                       match=r"image model \(patch_size=8\).*got \(3, 16, 16\). For one image add the batch dimension"):
        # read as 3 sequences of embeddings
        TransformerAdapter(vit, prefix_tokens=1).captum_inputs(torch.rand(3, 16, 16))
    torch.manual_seed(0)
    hf = HuggingFaceAdapter(transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
    )).eval())
    with pytest.raises(ValueError, match=r"pixel_values must be a tensor \[B, C, H, W\].*pixels\[None\]"):
        hf.captum_inputs(torch.rand(3, 16, 16))


# ---------------------------------------------------------------------------------------------- generated text


def test_string_target_is_tokenized_as_it_follows_the_prompt(byte_bpe):
    vocab = byte_bpe.get_vocab()
    continuation = [vocab[t] for t in ("Ġand", "Ġa", "Ġdry", "Ġcough")]  # what the model reads after "... fever"
    assert byte_bpe.encode("and a dry cough", add_special_tokens=False) != continuation  # on its own: 'and' is cut
    chefer = CheferLLMAttribution(gpt2_for(byte_bpe), byte_bpe)
    prompt = TextTokenInput("the patient has a fever", byte_bpe)
    from_text = chefer.attribute(prompt, target="and a dry cough")
    from_ids = chefer.attribute(prompt, target=continuation)
    assert from_text.output_tokens == from_ids.output_tokens
    assert torch.equal(from_text.token_attr, from_ids.token_attr)
    assert torch.equal(from_text.output_probs, from_ids.output_probs)
    # a target that brings its own space, or starts with punctuation, is joined as written
    assert torch.equal(chefer.attribute(prompt, target=" and a dry cough").token_attr, from_ids.token_attr)
    comma = chefer.attribute(prompt, target=", and a dry cough")
    assert comma.output_tokens[0] == "," and len(comma.output_tokens) == 5


def test_string_target_off_a_token_boundary_is_refused(byte_bpe):
    chefer = CheferLLMAttribution(gpt2_for(byte_bpe), byte_bpe)
    with pytest.raises(ValueError, match=r"does not start on a token boundary after the prompt: "
                                         r"the prompt ends in tokens \['Ġ'\], "
                                         r"but prompt and target together tokenize as \['Ġand'.*"
                                         r"without trailing whitespace"):
        chefer.attribute(TextTokenInput("the patient has a fever ", byte_bpe), target="and a dry cough")


def test_the_token_boundary_message_shows_where_prompt_and_target_part(byte_bpe):
    """The prompt's tokens from the first that differs, against the next three tokens of prompt and target together."""
    chefer = CheferLLMAttribution(gpt2_for(byte_bpe), byte_bpe)
    with pytest.raises(ValueError) as raised:
        chefer.attribute(TextTokenInput("the patient has a fever ", byte_bpe), target="and a dry cough")
    assert str(raised.value) == (
        "the target 'and a dry cough' does not start on a token boundary after the prompt: the prompt ends in tokens "
        "['Ġ'], but prompt and target together tokenize as ['Ġand', 'Ġa', 'Ġdry'] there: the tokenizer does not cut "
        "the text where the prompt ends. End the prompt at a word boundary without trailing whitespace "
        "(the target gets its leading space), or pass the target as token ids")


def test_word_level_targets_after_the_prompt_keep_working():
    tokenizer = word_tokenizer(["the", "patient", "reports", "fever", "and", "a", "dry", "cough", "since", "monday"])
    chefer = CheferLLMAttribution(gpt2_for(tokenizer), tokenizer)
    prompt = TextTokenInput("the patient reports fever", tokenizer, skip_tokens=["<s>"])
    result = chefer.attribute(prompt, target="and a dry cough")
    assert result.output_tokens == ["and", "a", "dry", "cough"]
    by_ids = chefer.attribute(prompt, target=tokenizer.convert_tokens_to_ids(["and", "a", "dry", "cough"]))
    assert torch.equal(result.token_attr, by_ids.token_attr)


def test_out_of_vocabulary_words_warn():
    tokenizer = word_tokenizer(["the", "patient", "reports", "fever", "and", "a", "dry", "cough"])
    chefer = CheferLLMAttribution(gpt2_for(tokenizer), tokenizer)
    prompt = TextTokenInput("the patient reports fever", tokenizer)
    with pytest.warns(OutOfVocabularyWarning, match=r"the target's words \['wet', 'with', 'sputum'\] are not in "
                                                    r"the tokenizer's vocabulary and become its unknown token '<unk>'"):
        result = chefer.attribute(prompt, target="and a wet cough with sputum")
    assert result.output_tokens == ["and", "a", "<unk>", "cough", "<unk>", "<unk>"]
    with pytest.warns(OutOfVocabularyWarning,
                      match=r"the prompt holds 1 word\(s\) the tokenizer does not know.*position\(s\) \[3\]"):
        chefer.attribute(TextTokenInput("the patient has fever", tokenizer), target="and a cough")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfVocabularyWarning)
        chefer.attribute(prompt, target="and a dry cough")


def test_a_gpt2_style_unknown_token_that_is_also_bos_does_not_warn(byte_bpe):
    """GPT-2's unknown token is its <|endoftext|> (bos and eos too): a prompt that starts with it knows every word."""
    assert byte_bpe.unk_token_id is None or byte_bpe.unk_token_id == byte_bpe.bos_token_id
    like_gpt2 = copy.deepcopy(byte_bpe)
    like_gpt2.unk_token = "<|endoftext|>"
    chefer = CheferLLMAttribution(gpt2_for(like_gpt2), like_gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfVocabularyWarning)
        result = chefer.attribute(
            TextTokenInput("<|endoftext|>the patient has a fever", like_gpt2), target="and a dry cough"
        )
    assert result.input_tokens[0] == "<|endoftext|>"


def test_llm_prompts_and_targets_the_model_cannot_read_are_refused():
    tokenizer = word_tokenizer(["the", "patient", "reports", "fever", "and", "a", "cough"])
    chefer = CheferLLMAttribution(gpt2_for(tokenizer), tokenizer)
    prompt = TextTokenInput("the patient", tokenizer)
    with pytest.raises(ValueError, match=r"the target holds token id 99, outside the model's vocabulary of 11 tokens"):
        chefer.attribute(prompt, target=[4, 99])
    no_bos = word_tokenizer(["the", "patient"], bos=False)
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        CheferLLMAttribution(gpt2_for(no_bos), no_bos).attribute(TextTokenInput("", no_bos), target="the")
    with pytest.raises(TypeError, match="one target per prompt \\(a list\\), not one string"):
        chefer.attribute_batch([prompt, prompt], "ab")  # would have explained 'a' after one and 'b' after the other
    other = word_tokenizer(["fever", "cough", "the", "patient"])
    with pytest.raises(ValueError, match=r"tokenized by another tokenizer.*same tokenizer"):
        chefer.attribute(TextTokenInput("the patient", other), target="reports")


# ---------------------------------------------------------------------------------------------- names of results


def test_wrong_feature_and_method_names_say_which_exist(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    scores = adapter.to_feature_dict(CheferAttribution(adapter).attribute(inputs, additional_forward_args=args))
    with pytest.raises(KeyError, match=r"no feature 'diagnoses' here; use one of \['conditions', 'procedures'\]"):
        scores["diagnoses"]
    comparison = compare_methods(adapter, seq_batch, [Saliency(adapter)], progress=False)
    with pytest.raises(KeyError, match=r"no method 'saliency' here; use one of \['Saliency'\]"):
        comparison.scores["saliency"]
    with pytest.raises(KeyError, match=r"no feature 'diagnoses'"):
        comparison.scores["Saliency"]["diagnoses"]
    evaluation = evaluate_methods(adapter, seq_batch, [Saliency(adapter)], infidelity_samples=0, progress=False)
    with pytest.raises(KeyError, match=r"no metric 'AOPC' here; use one of \['deletion_aopc', 'insertion_aopc'"):
        evaluation.per_sample["Saliency"]["AOPC"]
    assert dict(scores) == {k: scores[k] for k in ("conditions", "procedures")}  # otherwise a plain dict


def test_wrong_ground_truth_says_which_keys_it_returned(adapter, seq_batch):
    masks = adapter.token_masks(adapter.captum_inputs(seq_batch)[1])
    real = dict(zip(adapter.feature_keys, masks, strict=True))

    def run(truth):
        evaluate_methods(adapter, seq_batch, [Saliency(adapter)], ground_truth=lambda b: truth, infidelity_samples=0,
                         progress=False)

    with pytest.raises(KeyError, match=r"ground_truth returned masks for \['diagnoses'\], "
                                       r"but the model's feature keys are \['conditions', 'procedures'\] "
                                       r"\(missing \['conditions', 'procedures'\], unknown \['diagnoses'\]\)"):
        run({"diagnoses": real["conditions"]})
    with pytest.raises(ValueError,
                       match=r"mask for 'procedures' has shape \(6, 3\), but the batch's codes of 'procedures' are"):
        run({"conditions": real["conditions"], "procedures": real["procedures"][:, 0]})
    with pytest.raises(ValueError, match=r"values other than 0 and 1.*not scores"):
        run({k: m.float() * 0.5 for k, m in real.items()})
    with pytest.raises(KeyError, match=r"no entry for feature\(s\) \['procedures'\]: got entries for \['conditions'\]"):
        precision_at_k({k: m.float() for k, m in real.items()}, {"conditions": real["conditions"]}, real)


# ---------------------------------------------------------------------------------------------- empty tensors


def test_empty_batches_reaching_a_method_are_refused(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    empty_inputs, empty_args = tuple(x[:0] for x in inputs), tuple(a[:0] for a in args)
    for method in (CheferAttribution(adapter), Saliency(adapter)):
        with pytest.raises(ValueError, match=r"the inputs hold no samples \(batch size 0\)"):
            method.attribute(empty_inputs, additional_forward_args=empty_args)
    hf = HuggingFaceAdapter(bert())
    with pytest.raises(ValueError, match=r"the input 'input_ids' has shape \(0, 4\): no samples"):
        hf.captum_inputs({"input_ids": IDS[:0], "attention_mask": MASK[:0]})
    with pytest.raises(ValueError, match=r"the input 'input_ids' has shape \(2, 0\): no tokens"):
        hf.captum_inputs({"input_ids": IDS[:, :0], "attention_mask": MASK[:, :0]})
    embeddings, hf_args = hf.captum_inputs({"input_ids": IDS, "attention_mask": MASK})
    with pytest.raises(ValueError, match="no samples"):
        CheferAttribution(hf).attribute(embeddings[0][:0], target=0, additional_forward_args=(hf_args[0][:0],))


def test_a_text_sample_without_a_real_token_is_refused():
    adapter = HuggingFaceAdapter(bert())
    with pytest.raises(ValueError,
                       match=r"sample\(s\) \[1\] of the batch have no real token \(all padding\).*drop them"):
        adapter.captum_inputs({"input_ids": IDS, "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])})


def test_a_sample_without_codes_gets_no_relevance_and_leaves_the_others_alone(adapter, seq_batch):
    emptied = dict(seq_batch)
    emptied["conditions"] = seq_batch["conditions"].clone()
    emptied["conditions"][0] = 0  # patient 0 has no condition codes; its procedures stay
    method = CheferAttribution(adapter, preset="recommended")

    def scores(batch):
        inputs, args = adapter.captum_inputs(batch)
        target = adapter.captum_target(batch)
        return adapter.to_feature_dict(method.attribute(inputs, target=target, additional_forward_args=args))

    with_empty, original = scores(emptied), scores(seq_batch)
    assert torch.equal(with_empty["conditions"][0], torch.zeros_like(with_empty["conditions"][0]))
    assert bool(with_empty["procedures"][0].abs().sum() > 0)
    for key in adapter.feature_keys:  # every other patient as before: samples do not leak into each other
        torch.testing.assert_close(with_empty[key][1:], original[key][1:], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- targets


def test_binary_model_target_1_says_to_explain_the_one_logit(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    message = (r"^target 1 is out of range for a model with a single logit \(binary\): "
               r"that logit is the positive class's score, explained with target=None \(or 0\)$")
    for method in (CheferAttribution(adapter), Saliency(adapter), IntegratedGradients(adapter)):
        with pytest.raises(ValueError, match=message):
            method.attribute(inputs, target=1, additional_forward_args=args)
        with pytest.raises(ValueError, match=message):
            method.attribute(inputs, target=torch.ones(6, dtype=torch.long), additional_forward_args=args)
    hf = HuggingFaceAdapter(bert(num_labels=1))
    embeddings, hf_args = hf.captum_inputs({"input_ids": IDS, "attention_mask": MASK})
    with pytest.raises(ValueError, match=message):
        Saliency(hf).attribute(embeddings, target=1, additional_forward_args=hf_args)
    assert adapter.captum_target(seq_batch) is None and adapter.captum_target(seq_batch, mode="label") is None


def test_binary_records_name_the_class_the_logit_explains(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    attributions = CheferAttribution(adapter).attribute(inputs, additional_forward_args=args)
    positive = adapter.class_names()[1]
    for target in (None, 0, 1):  # 0 is Captum's index of the one logit: the positive class's score
        records = adapter.visualization_records(seq_batch, attributions, target)
        assert [r.attr_class for r in records] == [positive] * 6
    with pytest.raises(ValueError,
                       match=r"target 5 is not a class of a model with a single logit \(binary\).*None, 0 or 1"):
        adapter.visualization_records(seq_batch, attributions, 5)


def test_targets_beyond_the_classes_are_refused_for_captums_methods_too():
    hf = HuggingFaceAdapter(bert(num_labels=3))
    embeddings, args = hf.captum_inputs({"input_ids": IDS, "attention_mask": MASK})
    for target in (3, -1, [0, 3]):  # -1 would silently select the last class in Captum
        with pytest.raises(ValueError,
                           match=r"out of range: the model has 3 outputs, so targets are class indices 0\.\.2"):
            Saliency(hf).attribute(embeddings, target=target, additional_forward_args=args)
    with pytest.raises(ValueError, match=r"target 3 is out of range: the model has 3 classes \(0\.\.2\)"):
        hf.visualization_records({"input_ids": IDS, "attention_mask": MASK}, embeddings, 3)
    assert Saliency(hf).attribute(embeddings, target=2, additional_forward_args=args)[0].shape == embeddings[0].shape


def test_ids_beyond_the_vocabulary_are_refused(adapter, seq_batch):
    batch = dict(seq_batch)
    batch["conditions"] = seq_batch["conditions"].clone()
    batch["conditions"][0, 0] = 999
    with pytest.raises(ValueError,
                       match=r"feature 'conditions' holds code id 999, outside the model's vocabulary of \d+ codes"):
        adapter.captum_inputs(batch)
    hf = HuggingFaceAdapter(bert())
    with pytest.raises(ValueError,
                       match=r"token id 29, outside the model's vocabulary of 15 tokens.*model's own tokenizer"):
        hf.captum_inputs({"input_ids": IDS + 20, "attention_mask": MASK})


# ---------------------------------------------------------------------------------------------- values, sizes, devices


def test_nan_outputs_and_nan_embeddings_are_refused(seq_dataset, seq_batch):
    from conftest import make_model

    model = make_model(seq_dataset)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(seq_batch)
    with pytest.raises(ValueError, match=r"the explained output is NaN or infinite for sample\(s\) "
                                         r"\[0, 1, 2, 3, 4, 5\].*model's weights"):
        CheferAttribution(adapter).attribute(inputs, additional_forward_args=args)
    hf = HuggingFaceAdapter(bert())
    embeddings, hf_args = hf.captum_inputs({"input_ids": IDS, "attention_mask": MASK})
    poisoned = embeddings[0].clone()
    poisoned[1, 2, 3] = float("inf")
    for method in (CheferAttribution(hf), Saliency(hf)):
        with pytest.raises(ValueError, match=r"the input 'input_ids' holds 1 NaN or infinite value"):
            method.attribute(poisoned, target=0, additional_forward_args=hf_args)


def test_attention_masks_of_another_batch_size_are_refused():
    hf = HuggingFaceAdapter(bert())
    tokens, args = hf.captum_inputs({"input_ids": IDS, "attention_mask": MASK}, level="token")
    message = r"different batch sizes \(input 'input_ids' 2, the attention_mask 1\)"
    with pytest.raises(ValueError, match=message):  # one mask row used to broadcast over both samples
        CheferAttribution(hf).attribute(tokens, target=0, additional_forward_args=(args[0][:1],))
    with pytest.raises(ValueError, match=message):
        hf(tokens[0], args[0][:1])


def test_inputs_on_another_device_than_the_model_are_refused(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    elsewhere = tuple(x.to("meta") for x in inputs)
    message = (r"input 'conditions', input 'procedures' are on meta but the model is on cpu; "
               r"make the inputs with adapter.captum_inputs\(batch\)")
    for method in (CheferAttribution(adapter), Saliency(adapter)):
        with pytest.raises(ValueError, match=message):
            method.attribute(elsewhere, additional_forward_args=args)
    hf = HuggingFaceAdapter(bert())
    embeddings, hf_args = hf.captum_inputs({"input_ids": IDS, "attention_mask": MASK})
    for method in (CheferAttribution(hf), IntegratedGradients(hf)):
        with pytest.raises(ValueError, match=r"^input 'input_ids' is on meta but the model is on cpu"):
            method.attribute(embeddings[0].to("meta"), target=0, additional_forward_args=hf_args)


def test_a_huggingface_model_in_training_mode_is_explained_without_dropout():
    model = bert(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).train()
    adapter = HuggingFaceAdapter(model)
    tokens, args = adapter.captum_inputs({"input_ids": IDS, "attention_mask": MASK}, level="token")
    first = CheferAttribution(adapter).attribute(tokens, target=1, additional_forward_args=args)
    assert model.training and all(m.training for m in model.modules())
    reference = bert(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)  # the same weights, in eval mode
    expected = CheferAttribution(HuggingFaceAdapter(reference)).attribute(
        tokens, target=1, additional_forward_args=args
    )
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
