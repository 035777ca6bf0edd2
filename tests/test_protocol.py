"""captum_chefer.protocol on hand-made cases: the target check every adapter and the method share, and what
Capabilities reads of a forward function.

Each expected value or message is written out here, not read from the code under test.
"""

from __future__ import annotations

import re

import pytest
import torch

from captum_chefer.protocol import Capabilities, _accepts_keyword, _names_keyword, check_target_range


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


# ---------------------------------------------------------------------------------------------- check_target_range


@pytest.mark.parametrize("target", [True, False])
def test_a_bool_target_is_refused(target):
    with pytest.raises(TypeError, match=exact("target must be an int, a sequence of ints or a tensor, not a bool")):
        check_target_range(target, 2)


@pytest.mark.parametrize("target, classes", [
    (0, 2), (1, 2), (torch.tensor([0, 1, 1]), 2), ([0, 2, 1], 3), ([], 2), (torch.tensor([], dtype=torch.long), 2),
])
def test_targets_in_range_pass(target, classes):
    assert check_target_range(target, classes) is None


@pytest.mark.parametrize("target, classes", [
    (torch.tensor([5.0]), 2),  # floats are no class indices: the caller's own check says so
    (torch.tensor([True]), 1),  # nor bools
    (torch.tensor([3 + 0j]), 2),  # nor complex numbers
    ((0, 5), 2),  # a tuple is Captum's multi-dimensional target: its own indexing rules
    ([True, 3], 2),  # a list with a bool in it is not a list of class indices
    ([0.5, 7.0], 2),
])
def test_what_is_not_a_class_index_is_left_to_the_caller(target, classes):
    assert check_target_range(target, classes) is None


@pytest.mark.parametrize("target, shown", [
    (5, "5"), (-1, "-1"), (torch.tensor([0, 3]), "3"), ([0, 3], "3"), ([3, -2, 3], "[-2, 3]"),
    (torch.tensor([[4], [0]]), "4"),
])
def test_targets_out_of_range_are_named_with_the_range(target, shown):
    message = f"target {shown} is out of range: the model has 3 outputs, so targets are class indices 0..2"
    with pytest.raises(ValueError, match=exact(message)):
        check_target_range(target, 3)


def test_at_most_ten_bad_targets_are_named_in_order():
    # twelve distinct classes beyond a two-class model: 2..13, of which the first ten are shown
    message = ("target [2, 3, 4, 5, 6, 7, 8, 9, 10, 11] is out of range: the model has 2 outputs, so targets are class "
               "indices 0..1")
    with pytest.raises(ValueError, match=exact(message)):
        check_target_range(list(range(13, 1, -1)), 2)


@pytest.mark.parametrize("target", [1, [0, 1], torch.tensor([1])])
def test_a_single_logit_has_output_0_only(target):
    message = ("target 1 is out of range for a model with a single logit (binary): that logit is the positive class's "
               "score, explained with target=None (or 0)")
    with pytest.raises(ValueError, match=exact(message)):
        check_target_range(target, 1)


# ---------------------------------------------------------------------------------------------- Capabilities


class Minimal:
    def __call__(self, *args):
        return args[0]

    def attention_forward(self, inputs, additional_forward_args):
        raise NotImplementedError

    def relevance_to_inputs(self, relevance, inputs, additional_forward_args):
        raise NotImplementedError


class Full(Minimal):
    def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False, layernorm="exact"):
        raise NotImplementedError

    def require_attention(self):
        raise ValueError("no attention here")

    def probabilities(self, logits):
        return torch.sigmoid(logits)


class Open(Minimal):
    def attention_forward(self, inputs, additional_forward_args, **options):
        raise NotImplementedError


def test_capabilities_of_a_minimal_model():
    assert Capabilities.of(Minimal()) == Capabilities(False, False, None, None)


def test_capabilities_of_a_model_that_offers_everything():
    model = Full()
    capabilities = Capabilities.of(model)
    assert capabilities.pooled_row_only is True and capabilities.layernorm is True
    with pytest.raises(ValueError, match="no attention here"):
        capabilities.require_attention()
    assert capabilities.probabilities == model.probabilities
    assert capabilities.activation(torch.zeros(2, 3)) == "sigmoid"  # three sigmoids: a multilabel model


def test_keywords_taken_as_options_count_for_pooled_row_only_but_not_for_layernorm():
    # **options may accept pooled_row_only (full maps are always correct), but a layernorm keyword must be named:
    # a model that swallowed it would leave its layer norms exact while the method believes they are held
    capabilities = Capabilities.of(Open())
    assert (capabilities.pooled_row_only, capabilities.layernorm) == (True, False)


@pytest.mark.parametrize("width, probabilities, activation", [
    (1, None, "sigmoid"), (1, lambda z: z.softmax(dim=1), "sigmoid"),  # one logit is a sigmoid whatever it says
    (1, torch.sigmoid, "sigmoid"), (2, None, "softmax"), (2, lambda z: z.softmax(dim=1), "softmax"),
    (3, lambda z: z.softmax(dim=1), "softmax"), (3, torch.sigmoid, "sigmoid"),  # several sigmoids: multilabel
    (3, None, "softmax"),  # a model that does not say: softmax, Captum's usual classifier
])
def test_activation(width, probabilities, activation):
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])[:, :width]
    assert Capabilities(False, False, None, probabilities).activation(logits) == activation


def test_activation_asks_the_model_about_detached_logits():
    seen = []

    def probabilities(z):
        seen.append(z.requires_grad)
        return z.softmax(dim=1)

    logits = torch.zeros(2, 3, requires_grad=True)
    assert Capabilities(False, False, None, probabilities).activation(logits * 2) == "softmax"
    assert seen == [False]


# ---------------------------------------------------------------------------------------------- keyword readers


def test_accepts_keyword():
    def named(x, *, pooled_row_only=False): ...

    def other(x, *, layers=None): ...

    def options(x, **kwargs): ...

    assert _accepts_keyword(named, "pooled_row_only") and _accepts_keyword(options, "pooled_row_only")
    assert not _accepts_keyword(other, "pooled_row_only")
    assert not _accepts_keyword(max, "pooled_row_only")  # no signature to read: not passed


def test_names_keyword():
    def named(x, *, layernorm="exact"): ...

    def options(x, **kwargs): ...

    assert _names_keyword(named, "layernorm") and not _names_keyword(named, "layer")
    assert not _names_keyword(options, "layernorm") and not _names_keyword(max, "layernorm")
