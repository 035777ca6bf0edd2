"""Test-session settings shared by tests/ and the doctests in captum_chefer/."""

import torch

# The test models are tiny: one intra-op thread is several times faster than two on a 2-core machine
# that other work shares, and gives the same numbers run after run.
torch.set_num_threads(1)
