"""Make the flat modules at the repository root importable from the tests; shared fixtures."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """One of our checkpoints, small and quick to load: a byte-level tokenizer (no merges)."""
    import clip

    torch.manual_seed(0)
    model = clip.create_model("tiny-rn", transformer_layers=1, context_length=16,
                              vocab_size=515, eot_id=513)  # Tokenizer([]): SOT 512, EOT 513
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "model_config": model.config, "merges": []},
               path)
    return path
