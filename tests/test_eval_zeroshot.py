"""Zero-shot evaluation: classifier against a hand computation, metrics against brute force, errors."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import eval_zeroshot as ez



class FakeTokenizer:
    """Text i of `vocab` -> the row [i, 0, ..., 0]; records the context length it was asked for."""

    def __init__(self, texts):
        self.index = {t: i for i, t in enumerate(texts)}
        self.vocab_size = len(texts)
        self.eot_id = len(texts) - 1  # the largest id it emits
        self.calls = []

    def __call__(self, texts, context_length=77):
        self.calls.append((len(texts), context_length))
        ids = torch.zeros(len(texts), context_length, dtype=torch.long)
        ids[:, 0] = torch.tensor([self.index[t] for t in texts])
        return ids


class FakeCLIP(nn.Module):
    """encode_text looks the first token up in a fixed table; encode_image is the identity on (B, D)."""

    def __init__(self, text_table):
        super().__init__()
        self.register_buffer("table", text_table)
        self.scale = nn.Parameter(torch.ones(()))  # gives the model a dtype
        self.config = {"context_length": 7}
        self.modes = []

    def encode_text(self, ids):
        self.modes.append(self.training)
        return self.table[ids[:, 0]]

    def encode_image(self, images):
        self.modes.append(self.training)
        return images * self.scale


def make_setup(C=4, T=3, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    classnames = [f"class{c}" for c in range(C)]
    templates = [f"template {t} of a {{c}}." for t in range(T)]
    texts = [t.format(c=c) for c in classnames for t in templates]
    # rows of very different norms: normalising before averaging matters
    table = torch.randn(len(texts), D, generator=g) * torch.rand(len(texts), 1, generator=g) * 10
    return classnames, templates, FakeTokenizer(texts), FakeCLIP(table)


def test_classifier_matches_hand_computation():
    classnames, templates, tok, model = make_setup()
    W = ez.zero_shot_classifier(model, tok, classnames, templates, batch_size=5)  # chunks 5,5,2
    expected = []
    for c in classnames:
        rows = [model.table[tok.index[t.format(c=c)]] for t in templates]
        mean = sum(r / r.norm() for r in rows) / len(rows)
        expected.append(mean / mean.norm())
    expected = torch.stack(expected, dim=1)  # (D, C)
    assert W.shape == (5, 4)
    torch.testing.assert_close(W, expected)
    torch.testing.assert_close(W.norm(dim=0), torch.ones(4))
    # averaging the raw (unnormalised) embeddings would give a different classifier
    raw = torch.stack([sum(model.table[tok.index[t.format(c=c)]] for t in templates)
                       for c in classnames], dim=1)
    assert not torch.allclose(W, F.normalize(raw, dim=0), atol=1e-3)
    # batched: every prompt embedded once, in ceil(12 / 5) calls, with the model's context length
    assert tok.calls == [(5, 7), (5, 7), (2, 7)]
    torch.testing.assert_close(W, ez.zero_shot_classifier(model, tok, classnames, templates))


def test_agreeing_features_give_perfect_top1_and_restore_mode():
    classnames, templates, tok, model = make_setup(C=6)
    W = ez.zero_shot_classifier(model, tok, classnames, templates)  # (D, C)
    labels = torch.arange(6).repeat(5)
    images = W.T[labels] * 3 + 0.01 * torch.randn(30, 5)  # each image points at its class
    loader = DataLoader(TensorDataset(images, labels), batch_size=7)
    model.train()
    model.modes.clear()
    r = ez.zero_shot_eval(model, tok, loader, classnames, templates, mean_per_class=True)
    assert r["top1"] == 1.0 and r["top5"] == 1.0 and r["mean_per_class"] == 1.0 and r["n"] == 30
    assert model.training and not any(model.modes)  # evaluated in eval mode, then restored


def test_top1_top5_against_brute_force():
    classnames, templates, tok, model = make_setup(C=12, D=8, seed=1)
    images, labels = torch.randn(100, 8), torch.randint(0, 12, (100,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    r = ez.zero_shot_eval(model, tok, loader, classnames, templates)
    W = ez.zero_shot_classifier(model, tok, classnames, templates)
    logits = F.normalize(images, dim=-1) @ W  # (100, 12)
    rank = (logits > logits.gather(1, labels[:, None])).sum(1)  # classes scored above the label
    assert r["top1"] == pytest.approx((rank == 0).float().mean().item())
    assert r["top5"] == pytest.approx((rank < 5).float().mean().item())
    assert 0 < r["top1"] <= r["top5"] < 1


def test_mean_per_class_accuracy_imbalanced():
    labels = torch.tensor([0] * 8 + [1] * 2 + [2] * 2)
    pred = torch.tensor([0] * 8 + [0, 0] + [2, 1])  # class 0: 8/8, class 1: 0/2, class 2: 1/2
    assert (pred == labels).float().mean().item() == pytest.approx(9 / 12)
    # class 3 never occurs and is left out of the mean
    assert ez.mean_per_class_accuracy(pred, labels, 4) == pytest.approx((1 + 0 + 0.5) / 3)


def test_vocab_mismatch_is_reported():
    classnames, templates, tok, model = make_setup()
    model.token_embedding = nn.Embedding(2, 2)  # the tokenizer's SOT/EOT ids would not fit
    with pytest.raises(ValueError, match="tokenizer"):
        ez.zero_shot_classifier(model, tok, classnames, templates)


def test_openai_checkpoints_fit_our_tokenizer():
    """OpenAI's weights have 49408 token rows; our tokenizer adds MASK = 49408, which prompts
    never contain, so the check must let them through."""
    classnames, templates, tok, model = make_setup()
    tok.vocab_size, tok.eot_id = 49409, 49407
    model.token_embedding = nn.Embedding(49408, 2)
    ez.zero_shot_classifier(model, tok, classnames, templates)  # no error


def test_assets():
    names, templates = ez.load_metadata("classnames"), ez.load_metadata("templates")
    assert len(names["imagenet1k"]) == 1000 and len(templates["imagenet1k"]) == 80
    assert len(names["cifar10"]) == 10 and len(names["cifar100"]) == 100
    assert len(templates["cifar10"]) == 18 and templates["cifar100"] == templates["cifar10"]
    assert names["imagenet1k"].count("missile") == 2  # CLIP's list keeps its duplicates
    assert all(t.count("{c}") == 1 for ts in templates.values() for t in ts)


def test_missing_roots_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ez.torchvision_dataset("CIFAR10", str(tmp_path), train=False)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "download=True" in msg
    with pytest.raises(SystemExit) as e:
        ez.main(["--checkpoint", "x.pt", "--dataset", "cifar100", "--data-root",
                 str(tmp_path / "nope")])
    assert "\n" not in str(e.value) and "--data-root" in str(e.value) and "CIFAR100" in str(e.value)
    with pytest.raises(FileNotFoundError, match="ImageNet"):
        ez.imagenet_split(str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="--checkpoint"):  # the loader's (factory.py) error
        ez.main(["--checkpoint", str(tmp_path / "missing.pt"), "--dataset", "builtin"])
    import factory

    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        factory.load_model_and_tokenizer(str(tmp_path / "missing.pt"))


def test_folder_dataset_and_classname_files(tmp_path):
    for name in ("red_circle", "blue_square"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / name / "a.png")
    ds, names, key = ez.zero_shot_dataset("folder", str(tmp_path / "imgs"), None)
    assert names == ["blue square", "red circle"] and key == "imagenet1k" and len(ds) == 2
    (tmp_path / "names.txt").write_text("navy box\n\ncrimson disc, big\n")
    _, names, _ = ez.zero_shot_dataset("folder", str(tmp_path / "imgs"), None,
                                       str(tmp_path / "names.txt"))
    assert names == ["navy box", "crimson disc, big"]
    (tmp_path / "names.json").write_text(json.dumps(["only one"]))
    with pytest.raises(ValueError, match="1 names for the 2 classes"):
        ez.zero_shot_dataset("folder", str(tmp_path / "imgs"), None, str(tmp_path / "names.json"))


def test_evaluate_builtin_end_to_end(tmp_path):
    import factory
    from tokenizer import Tokenizer

    torch.manual_seed(0)
    model = factory.create_model("tiny").train()
    r = ez.evaluate_builtin(model, Tokenizer.openai(), n=96, batch_size=48)
    assert set(r) >= {"top1", "top5", "n"} and r["n"] == 96
    assert 0 <= r["top1"] <= r["top5"] <= 1
    assert model.training  # mode restored for the training loop
    # the CLI on one of our checkpoints (merges None -> OpenAI's BPE), with a JSON result;
    # a shallower model keeps this part fast
    model = factory.create_model("tiny", vision_layers=1, transformer_layers=1, context_length=16)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "model_config": model.config, "merges": None},
               path)
    out = tmp_path / "r.json"
    ez.main(["--checkpoint", str(path), "--n", "48", "--batch-size", "48", "--workers", "0",
             "--device", "cpu", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["n"] == 48 and 0 <= saved["top1"] <= saved["top5"] <= 1


def test_colour_and_shape_accuracy_split_top1():
    # 6 shapes: class 13 = colour 2, shape 1
    label = torch.tensor([13, 13, 13, 13])
    pred = torch.tensor([13, 14, 7, 0])    # right; right colour; right shape; neither
    assert ez.colour_shape_accuracy(pred, label, 6) == {"colour": 0.5, "shape": 0.5}
    assert ez.format_result({"top1": 0.25, "top5": 1.0, "colour": 0.5, "shape": 0.5}) == \
        "top-1 25.0%  top-5 100.0%  (colour 50.0%, shape 50.0%)"
