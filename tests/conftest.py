"""Shared pytest setup: one CPU thread (the machines are shared) and a fixed seed per test."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed():
    """Seed torch's global RNG with 0 before every test; returns the seed."""
    torch.manual_seed(0)
    return 0
