"""Make the flat modules at the repository root (and experiments/) importable from the tests;
shared fixtures."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "experiments"))  # study.py and its siblings (not library)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """One of our checkpoints, small and quick to load: a byte-level tokenizer (no merges)."""
    import factory

    torch.manual_seed(0)
    model = factory.create_model("tiny-rn", transformer_layers=1, context_length=16,
                                 vocab_size=515, eot_id=513)  # Tokenizer([]): SOT 512, EOT 513
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "model_config": model.config, "merges": []},
               path)
    return path
