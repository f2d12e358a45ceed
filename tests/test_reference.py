"""clip.py and factory.py against OpenCLIP's stored outputs for OpenAI-layout checkpoints, with
no OpenCLIP needed.

tests/data/openai_reference_{rn,vit}.pt (written by experiments/make_reference.py) hold, for a
small ModifiedResNet and a small ViT CLIP in OpenAI's checkpoint layout (QuickGELU, vocabulary
49408, EOT = the largest id): the key names and shapes, fixed images and OpenAI-tokenized
captions, and the encode_image / encode_text outputs OpenCLIP computed in eval mode. The weights
themselves are regenerated here by the tool's integer-hash recipe (exact on every machine), so
the files stay ~160 kB. A user holding OpenAI's RN50.pt / ViT-B-32.pt takes the same path:
factory.build_model infers the architecture from shapes, factory.load_checkpoint reads plain or
TorchScript files.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn as nn

import clip
import factory
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
ARCHS = ("rn", "vit")
# float32 through a few layers, computed by two implementations (SDPA vs nn.MultiheadAttention):
# errors ~1e-6 of the output's scale; a wrong activation or pooling gives ~1e-1 (see negatives)
RTOL = 1e-5


def _recipe():
    """experiments/make_reference.py, loaded by path (an `experiments` package may exist
    elsewhere)."""
    path = os.path.join(ROOT, "experiments", "make_reference.py")
    spec = importlib.util.spec_from_file_location("declip_make_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no side effects: imports and definitions only
    return module


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only waits on a busy core (seconds of spin
    when other processes load the machine), so run single-threaded and restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_CACHE = {}


def reference(arch):
    """(stored reference dict, regenerated OpenAI-layout state dict), once per process."""
    if arch not in _CACHE:
        ref = torch.load(os.path.join(DATA, f"openai_reference_{arch}.pt"), weights_only=True)
        recipe = _recipe()
        sd = recipe.reference_weights(ref["shapes"], ref["seed"])
        assert recipe.checksum(sd) == pytest.approx(ref["checksum"], rel=1e-12), \
            "the weight recipe changed since the reference was written: rerun make_reference.py"
        _CACHE[arch] = ref, sd
    return _CACHE[arch]


def assert_matches(model, ref):
    with torch.no_grad():
        z_img, z_txt = model.encode_image(ref["images"]), model.encode_text(ref["ids"])
    for got, want in ((z_img, ref["z_img"]), (z_txt, ref["z_txt"])):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())


def max_error(model, ref):
    """Largest difference from OpenCLIP relative to the output's scale, image and text."""
    with torch.no_grad():
        z_img, z_txt = model.encode_image(ref["images"]), model.encode_text(ref["ids"])
    return [((got - want).abs().max() / want.abs().max()).item()
            for got, want in ((z_img, ref["z_img"]), (z_txt, ref["z_txt"]))]


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_inputs_are_openai_like(arch):
    ref, sd = reference(arch)
    ids = ref["ids"]
    assert sd["token_embedding.weight"].shape[0] == 49408 and ids.max() == 49407
    assert (ids[:, 0] == 49406).all() and ((ids == 49407).sum(dim=1) == 1).all()
    assert ids[3, -1] == 49407  # the long caption was cut: EOT in the last position
    # the features depend on the inputs (a test of constant outputs would prove little)
    assert ref["z_img"].std(dim=0).mean() > 0.05 * ref["z_img"].std()
    assert ref["z_txt"].std(dim=0).mean() > 0.05 * ref["z_txt"].std()


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_matches_openclip(arch):
    ref, sd = reference(arch)
    model = factory.build_model(sd)
    assert not model.training and model.config["act"] == "quick_gelu"
    assert model.config["vocab_size"] == 49408 and model.eot_id == 49407
    is_vit = arch == "vit"
    assert model.config["vision_layers"] == (2 if is_vit else (1, 2, 1, 1))
    assert model.config["transformer_heads"] == 2
    assert sorted(model.state_dict()) == sorted(sd)  # OpenAI's names, nothing more or less
    assert_matches(model, ref)


def _torchscript_archive(state_dict, path, input_resolution, context_length, vocab_size):
    """A TorchScript file whose state_dict() has `state_dict`'s names, plus the metadata buffers
    OpenAI's JIT archives carry (as theirs, it is a scripted module; this one computes nothing)."""
    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for name, value in state_dict.items():
        *path_parts, leaf = name.split(".")
        module = root
        for part in path_parts:
            if not hasattr(module, part):
                module.add_module(part, Holder())
            module = getattr(module, part)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, value.clone())
    for key, value in (("input_resolution", input_resolution),
                       ("context_length", context_length), ("vocab_size", vocab_size)):
        root.register_buffer(key, torch.tensor(value))
    torch.jit.save(torch.jit.script(root), path)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_checkpoint_plain_and_torchscript(arch, tmp_path):
    ref, sd = reference(arch)
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    assert_matches(factory.load_checkpoint(plain), ref)

    # OpenAI's released archives keep matrices in float16 (norms in float32): loading casts to
    # float32, so the result must equal the float32 model of the fp16-rounded weights
    half = {k: v.half() if v.is_floating_point() and v.dim() >= 2 else v for k, v in sd.items()}
    jit = tmp_path / "jit.pt"
    _torchscript_archive(half, jit, 64, 16, 49408)
    model = factory.load_checkpoint(jit)
    want = factory.build_model({k: v.float() if v.is_floating_point() else v
                                for k, v in half.items()})
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(ref["images"]),
                                   want.encode_image(ref["images"]), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(ref["ids"]), want.encode_text(ref["ids"]),
                                   rtol=0, atol=0)
    assert max(max_error(model, ref)) < 0.05  # fp16 rounding, not a different network


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_comparison_can_fail(arch, monkeypatch):
    """Negative controls: near-miss models must be told apart from OpenAI's by a wide margin."""
    ref, sd = reference(arch)
    assert max(max_error(factory.build_model(sd), ref)) < RTOL
    assert max_error(factory.build_model(sd, act="gelu"), ref)[1] > 100 * RTOL  # exact GELU
    monkeypatch.setattr(clip.QuickGELU, "forward", lambda self, x: x * torch.sigmoid(1.7 * x))
    errors = max_error(factory.build_model(sd), ref)  # 1.7 instead of 1.702
    assert errors[1] > 10 * RTOL and (arch == "rn" or errors[0] > 10 * RTOL)


def test_our_tokenizer_gives_openai_ids():
    """The stored ids come from OpenAI's tokenizer (via open_clip.tokenize): ours must agree."""
    ref, _ = reference("rn")
    ids = tokenizer.Tokenizer.openai()(ref["captions"], context_length=16)
    assert torch.equal(ids, ref["ids"])
