"""Run by .ci/wheel-check in a fresh environment with the wheel installed: the installed package, not the source
tree, is imported, and it explains a plain PyTorch transformer with Chefer and Integrated Gradients."""

import importlib.metadata
import sys
from pathlib import Path

import torch
from captum.attr import IntegratedGradients
from torch import nn

import captum_chefer
from captum_chefer import CheferAttribution, TransformerAdapter

checkout = Path(sys.argv[1]).resolve()
installed = Path(captum_chefer.__file__).resolve()
assert checkout not in installed.parents, f"captum_chefer was imported from the checkout: {installed}"
assert Path(sys.prefix) in installed.parents, f"captum_chefer is not the fresh environment's: {installed}"
distribution = importlib.metadata.distribution("captum_chefer")
assert distribution.version == captum_chefer.__version__, (distribution.version, captum_chefer.__version__)
files = {str(f) for f in distribution.files or ()}
assert "captum_chefer/py.typed" in files, "the wheel has no py.typed"
assert not [f for f in files if f.startswith("tests/")], "the wheel ships tests"


class Classifier(nn.Module):
    """[CLS] + token embeddings -> nn.TransformerEncoder -> [CLS] -> logits; id 0 is padding."""

    def __init__(self, vocab: int = 20, dim: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(len(ids), -1, -1), self.embed(ids)], dim=1)
        padding = torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.bool), ids == 0], dim=1)
        return self.head(self.encoder(x, src_key_padding_mask=padding)[:, 0])


torch.manual_seed(0)
model = Classifier().eval()
adapter = TransformerAdapter(model, pool="first", prefix_tokens=1, embedding=model.embed, pad_id=0)
ids = torch.tensor([[5, 9, 13, 2], [7, 3, 0, 0]])
tokens, args = adapter.captum_inputs(ids, level="token")
chefer = CheferAttribution(adapter, preset="recommended")
(relevance,) = chefer.attribute(tokens, target=1, additional_forward_args=args)
assert relevance.shape == (2, 4) and bool((relevance[1, 2:] == 0).all()) and bool(relevance[0].abs().sum() > 0)
embeddings, args = adapter.captum_inputs(ids)
(ig,) = IntegratedGradients(adapter).attribute(embeddings, target=1, additional_forward_args=args, n_steps=8)
assert ig.shape == (2, 4, 16) and bool(torch.isfinite(ig).all())
print(f"captum_chefer {captum_chefer.__version__} from {installed.parent}: Chefer and IG explained a transformer")
