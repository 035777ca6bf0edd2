"""The model and data of the cohort tests, as ``captum-chefer cohort --build tests/cohort_build.py`` loads them.

``build()`` opens the disk-backed PyHealth dataset at ``$CAPTUM_CHEFER_TEST_DATASET`` (written by the test
beforehand: a disk-backed dataset under ``torchrun`` counts its samples differently, which the tests must
cover) and makes an untrained two-layer Transformer with a fixed seed, the same in every process.
"""

from __future__ import annotations

import os
from typing import Any

import torch

ENV = "CAPTUM_CHEFER_TEST_DATASET"


def build() -> tuple[Any, Any]:
    from pyhealth.datasets.sample_dataset import SampleDataset
    from pyhealth.models import Transformer

    from captum_chefer.synthetic import quiet_pyhealth

    with quiet_pyhealth():
        dataset = SampleDataset(os.environ[ENV])
        torch.manual_seed(0)
        model = Transformer(dataset=dataset, embedding_dim=16, heads=2, num_layers=2)
    return model.eval(), dataset
