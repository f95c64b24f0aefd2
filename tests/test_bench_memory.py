"""Memory of a training step (satconv.bench.memory): activations saved for the backward pass."""
import pytest
import torch
from torch import nn

from satconv.bench import memory


def test_saved_activation_bytes_separates_activations_from_weights():
    """The first linear layer keeps its input (it grows with the batch), ReLU its output, which the second
    linear layer keeps as its input too (one storage, counted once), and the second layer keeps its weight
    (the first needs no input gradient, so it keeps no weight)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False))
    per_image, fixed = memory.saved_activation_bytes(model, image_size=4, batch=3, bf16=False)
    assert per_image == 3 * 4 * 4 * 4 + 5 * 4  # float32: the flattened image, the ReLU output
    assert fixed == 2 * 5 * 4  # the second layer's weight
    with pytest.raises(ValueError):
        memory.saved_activation_bytes(model, batch=0)


def test_saved_activation_bytes_of_the_compiled_graphs_never_exceed_eager():
    """Inductor's partition keeps at most what eager autograd keeps (here: the same input, and ReLU's mask
    or output), and still grows with the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False))
    eager, _ = memory.saved_activation_bytes(model, image_size=4, batch=3, bf16=False)
    compiled, _ = memory.saved_activation_bytes(model, image_size=4, batch=3, bf16=False, compile=True)
    assert 3 * 4 * 4 * 4 <= compiled <= eager
