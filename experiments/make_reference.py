"""Writes tests/data/openai_reference_{rn,vit}.pt: OpenCLIP's outputs for two small OpenAI models.

tests/test_reference.py proves, without OpenCLIP installed, that a user holding an OpenAI
checkpoint (RN50.pt, ViT-B-32.pt: OpenAI's parameter names, QuickGELU, EOT = the largest token
id) gets OpenAI's features from factory.build_model / factory.load_checkpoint. Real OpenAI
weights are hundreds of MB, so two small models of the same two architectures stand in for them:

    rn:  ModifiedResNet, vision_layers (1, 2, 1, 1), width 16, 64 px  (attnpool: 8 heads)
    vit: ViT, width 128, 2 layers, patch 16, 64 px                    (2 heads)
    both: text context 16, OpenAI's vocabulary (49408), width 128, 2 layers (2 heads), embed 64

Head counts follow OpenAI's rule (width / 64; ResNet 32 width / 64), the rule build_model uses,
since head counts are not visible in a state dict.

The weights are not stored: `reference_weights` slices every tensor out of one pool of values
computed from (seed, index) by an integer hash, from a start given by the key's sorted index, so
they are bit-identical on any machine and torch version (torch.randn is not promised to be).
A reference file (~160 kB) holds what the recipe needs (key names and shapes, in OpenAI's
checkpoint layout), fixed inputs and OpenCLIP's outputs:
    {"arch", "seed", "shapes": {key: shape}, "checksum" (catches recipe drift),
     "images": (3, 3, 64, 64) float32 (seeded randn: smooth + noise), "captions": [str],
     "ids": (5, 16) int64 (OpenAI's tokenizer via open_clip.tokenize: SOT 49406, EOT 49407),
     "z_img": (3, 64), "z_txt": (5, 64) float32, OpenCLIP in eval mode, not normalised,
     "versions": {"open_clip", "torch"}}

Run once, by a developer with OpenCLIP installed (pip install open_clip_torch; it is not a
project dependency), from the repository root:
    python experiments/make_reference.py            # writes tests/data/openai_reference_*.pt
The outputs are checked twice here: OpenCLIP's CLIP built from explicit configs, and OpenCLIP's
own OpenAI loader (build_model_from_openai_state_dict, the path RN50.pt takes) must agree.

Deliberately left out: storing weights (the recipe regenerates them) and float16 references
(OpenAI's archives are partly fp16; the test casts these weights to fp16 itself).
"""
import argparse
import math
import os

import torch
import torch.nn.functional as F

SPECS = {  # OpenCLIP's CLIP(embed_dim, vision_cfg, text_cfg) arguments
    "rn": dict(embed_dim=64, vision_cfg=dict(layers=(1, 2, 1, 1), width=16, image_size=64),
               text_cfg=dict(context_length=16, vocab_size=49408, width=128, heads=2, layers=2)),
    "vit": dict(embed_dim=64, vision_cfg=dict(layers=2, width=128, patch_size=16, image_size=64),
                text_cfg=dict(context_length=16, vocab_size=49408, width=128, heads=2, layers=2)),
}
SEEDS = {"rn": 1, "vit": 2}
CAPTIONS = ["a photo of a dog.", "", "A diagram of two red cubes!",
            "a very long caption that runs well past the sixteen tokens of this small "
            "context, so OpenAI's tokenizer cuts it and puts EOT last", "an image of 3 cats"]
_MASK = 0xFFFFFFFF
_POOL = 1_000_003  # a prime: a tensor longer than the pool wraps onto no row boundary


def _uniform(n, seed):
    """n floats in [-1, 1) from a 32-bit integer hash of (seed, i): exact everywhere.

    Every product stays below 2**63, so int64 arithmetic never overflows."""
    x = (torch.arange(n, dtype=torch.int64) * 0x9E3779B1 + seed * 0x7FEB352D) & _MASK
    for _ in range(3):  # xor-shift-multiply rounds mix every input bit into every output bit
        x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK
    x = (x >> 16) ^ x
    return (x.double() / 2.0 ** 31 - 1.0).float()  # (n,), float32 values exactly


def _draw(pool, n, key_index):
    """n consecutive pool values from a start that depends on the key (wrapping around): hashing
    every weight of a 49408-token embedding costs seconds, slicing one pool costs nothing."""
    start = (key_index * 0x9E3779B1) % len(pool)
    reps = (start + n + len(pool) - 1) // len(pool)
    return (pool.repeat(reps) if reps > 1 else pool)[start:start + n]


def reference_weights(shapes, seed):
    """A full OpenAI-style state dict for `shapes` ({key: shape}); keys are taken in sorted order.

    Matrices get unit-variance entries / sqrt(fan_in) so activations stay O(1) through the network
    (OpenAI's 0.02-ish inits would leave tiny, nearly input-independent features, a weak test);
    norms get weights near 1; BatchNorm running variances below 1 stand in for the statistics a
    trained net would have, so that the ResNet's features neither vanish nor explode."""
    pool = _uniform(_POOL, seed) * math.sqrt(3)  # unit variance
    out = {}
    for k, name in enumerate(sorted(shapes)):
        shape = tuple(shapes[name])
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros(shape, dtype=torch.long)
            continue
        if name == "logit_scale":
            out[name] = torch.full(shape, math.log(1 / 0.07))
            continue
        u = _draw(pool, math.prod(shape), k).view(shape)
        if name.endswith("running_var"):
            w = 0.2 + 0.3 * u.abs()  # keeps the ResNet's activations O(1) and input-dependent
        elif name.endswith("running_mean"):
            w = 0.1 * u
        elif len(shape) == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scale
            w = 1 + 0.2 * u
        elif len(shape) == 1 and not name.endswith("embedding"):  # biases
            w = 0.1 * u
        elif name in ("text_projection", "visual.proj"):  # used as x @ P: fan-in is dim 0
            w = u / math.sqrt(shape[0])
        elif name.endswith("embedding") or name.endswith("embedding.weight") or (
                name == "visual.conv1.weight" and "visual.proj" in shapes):
            # transformer inputs (tokens, positions, ViT patches) of small variance, ~1e-2 as
            # in OpenAI's weights: a LayerNorm eps other than OpenAI's 1e-5 then shows
            w = 0.1 * u / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else 1)
        else:  # (out, in, ...) weights
            w = u / math.sqrt(math.prod(shape[1:]))
        out[name] = w.contiguous()
    return out


def checksum(state_dict):
    """sum |w| over every 101st element of every tensor: cheap, and any change of recipe shows."""
    return sum(v.reshape(-1)[::101].double().abs().sum().item() for v in state_dict.values())


def make(arch):
    import open_clip  # only the generator needs it

    torch.manual_seed(0)  # the initialisation below is overwritten; keeps construction repeatable
    spec = SPECS[arch]
    model = open_clip.model.CLIP(spec["embed_dim"], spec["vision_cfg"], spec["text_cfg"],
                                 quick_gelu=True).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = reference_weights(shapes, SEEDS[arch])
    model.load_state_dict(sd)

    g = torch.Generator().manual_seed(100 + SEEDS[arch])
    r = spec["vision_cfg"]["image_size"]
    # smooth images plus noise, like photos: white noise alone averages away in the ResNet's
    # pooling and leaves features that hardly depend on the image
    images = F.interpolate(torch.randn(3, 3, r // 8, r // 8, generator=g), size=r,
                           mode="bilinear") + 0.3 * torch.randn(3, 3, r, r, generator=g)
    ids = open_clip.tokenize(CAPTIONS, context_length=spec["text_cfg"]["context_length"])
    assert ids.max() == 49407 and (ids.argmax(dim=1) == (ids == 49407).int().argmax(dim=1)).all()
    with torch.no_grad():
        z_img, z_txt = model.encode_image(images), model.encode_text(ids)  # (3, D), (5, D)
        # OpenCLIP's loader for OpenAI's released files must infer the same architecture; it
        # rounds the weights to fp16 (as OpenAI's files are), so reload them in fp32 to compare
        ref = open_clip.model.build_model_from_openai_state_dict(
            {k: v.clone() for k, v in sd.items()}, quick_gelu=True, cast_dtype=None).float()
        ref.load_state_dict(sd)
        torch.testing.assert_close(ref.encode_image(images), z_img, rtol=0, atol=1e-6)
        torch.testing.assert_close(ref.encode_text(ids), z_txt, rtol=0, atol=1e-6)
    return {
        "arch": arch, "seed": SEEDS[arch], "shapes": shapes, "checksum": checksum(sd),
        "images": images, "captions": list(CAPTIONS), "ids": ids,
        "z_img": z_img.float().contiguous(), "z_txt": z_txt.float().contiguous(),
        "versions": {"open_clip": open_clip.__version__, "torch": str(torch.__version__)},
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join("tests", "data"), help="output folder")
    args = p.parse_args()
    try:
        import open_clip  # noqa: F401
    except ImportError:
        raise SystemExit("experiments/make_reference.py: needs OpenCLIP; "
                         "pip install open_clip_torch")
    os.makedirs(args.out, exist_ok=True)
    for arch in SPECS:
        path = os.path.join(args.out, f"openai_reference_{arch}.pt")
        ref = make(arch)
        torch.save(ref, path)
        print(f"{path}: {os.path.getsize(path)} bytes, z_img {tuple(ref['z_img'].shape)} "
              f"std {ref['z_img'].std():.3f}, z_txt {tuple(ref['z_txt'].shape)} "
              f"std {ref['z_txt'].std():.3f}")


if __name__ == "__main__":
    main()
