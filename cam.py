"""Where the model finds a text in an image: class activation maps (DeCLIP Sec. 4.5, Fig. 8).

DeCLIP's Fig. 8 draws CAMs (Zhou et al. 2016) to show that DeCLIP's features cover the whole
object where CLIP looks at a few parts. CAM proper needs a global-average-pool + linear head;
CLIP's towers end in attention pooling (ModifiedResNet) or a class token (ViT), so we use Grad-CAM
(Selvaraju et al. 2017), CAM's generalisation to any differentiable head. For the activations A
(B, C, h, w) of one layer and a score s per image:

    alpha = mean_{h,w} ds/dA                          # (B, C) how much each channel pushes s
    cam = ReLU(sum_c alpha_c A_c)                     # (B, h, w), upsampled bilinearly, / its max

The score is s = z_img . normalize(z_txt): the (unnormalised) image embedding projected on the
text's direction. Not the cosine: the cosine does not change when z_img is scaled, so (Euler) its
gradient is orthogonal to z_img, and for a head that pools A linearly sum_c alpha_c A_c cancels
to exactly 0 (tests/test_cam.py checks both). For one image both rank texts the same way.

The layer (`cam_layer`): the deepest candidate whose map is at least MIN_SIDE = 7 per side,
Grad-CAM's own grid on a 224 px ResNet; a coarser map can only point at a few quadrants.
- ModifiedResNet (OpenAI's RN50/RN101, our tiny-rn) and torchvision's ResNet (pretrained.py):
  the stage outputs layer1..layer4, at R/4, R/8, R/16, R/32 per side. RN50 at 224 px keeps
  `layer4` (7 x 7); tiny-rn at 64 px gets `layer2` (8 x 8), not its 2 x 2 `layer4`. On the demo
  model (`python train.py`, 420 eval images) the pointing game for layer1..4 is 84.5 / 93.6 /
  83.8 / 81.2% within 4 px (41.9 / 54.8 / 48.8 / 36.0% on the object itself; the image centre
  44.3%): the 8 x 8 map points best, the 2 x 2 one worst.
- ViT: Grad-CAM on the patch tokens as they enter the last block (its `ln_1` output, the grid of
  N patches reshaped to (W, g, g); every block has the same grid, so the rule has no choice).
  Not the last block's *output*: only its class token reaches the embedding, so the gradient at
  its patch tokens is zero. We chose Grad-CAM over gradient-weighted attention rollout (Chefer
  et al. 2021) so that one formula serves both tower kinds, and because rollout needs every
  block's attention probabilities, which F.scaled_dot_product_attention does not return (we
  would re-implement attention for it). ToMe is switched off while a map is made (merged tokens
  have no place on the grid).
Any other layer: `grad_cam(..., layer=module)` or `--layer visual.layer3`.

Pointing game (Zhang et al. 2016) on the built-in eval split, where the object's pixels are known:
the fraction of images whose CAM peak, for the prompt-ensembled zero-shot embedding of the image's
class, lies on a copy of the main object, up to a tolerance: Zhang et al.'s 15 px, scaled to the
image (15 px at 224, 4 px at 64; `on_object` counts without it). The peaks of a 64 px model's map
sit on the object's edge or a few pixels beside it far more often than on its inside. Two
baselines under the same tolerance: chance, the grown objects' mean area fraction (a random
point), and the centre, how often the image's centre pixel is near the object (the built-in
objects sit in a 3 x 3 grid, so the centre is often on one; a flat map points there).
The peak is the maximal pixel of the upsampled map; among equal maxima (bilinear upsampling
clamps at the border, so a coarse map peaks on a plateau; a flat map is all maxima) the one
nearest the image centre, so a 2 x 2 map points near the centre of its best cell.

Shapes: B images, C channels, h x w the layer's grid, R image side, D embedding.

Usage:
    python cam.py --checkpoint runs/demo/checkpoint.pt --dataset builtin --out results/cam.png
        # the grid, and the pointing game (on by default for the built-in data; --no-pointing)
    python cam.py --checkpoint a.pt --compare b.pt --dataset builtin --out cam.png
    python cam.py --checkpoint ViT-B-32.pt --images a.jpg b.jpg --texts "a dog" "a cat" --out c.png

    maps = grad_cam(model, images, z_txt)             # (B, R, R) in [0, 1], layer cam_layer(model)
    result = pointing_game(model, tokenizer, SyntheticCaptions("eval", 420), n=420)
    # {"pointing", "on_object", "chance", "centre": fractions in [0, 1], "tolerance": 4, "n": 420}

Left out: Grad-CAM++ / Score-CAM and other variants, rollout, negative evidence (ReLU drops it),
and batched drawing of more than a few dozen images.
"""
import argparse
import os
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from charts import font


# ------------------------------------------------------------------------------------ Grad-CAM

MIN_SIDE = 7  # the coarsest Grad-CAM grid of the paper (ResNet at 224 px: 7 x 7 layer4)


def cam_candidates(model):
    """The layers cam_layer chooses from, shallow to deep: a ResNet's stages (layer1..layer4),
    a ViT's patch tokens entering its last block (its grid is the same in every block)."""
    visual = model.visual
    if hasattr(visual, "resnet"):  # pretrained.TorchvisionResNetTower
        visual = visual.resnet
    stages = [getattr(visual, f"layer{k}") for k in range(1, 5) if hasattr(visual, f"layer{k}")]
    if stages:  # CLIP's ModifiedResNet, torchvision's ResNet
        return stages
    if hasattr(visual, "transformer"):  # VisionTransformer: tokens entering the last block
        return [visual.transformer.resblocks[-1].ln_1]
    raise ValueError(f"no default Grad-CAM layer for a {type(visual).__name__} image tower; "
                     f"pass layer= (a module of model.visual)")


class _Stop(Exception):
    """Ends a dry forward pass once the last candidate layer has been seen."""


def map_sides(model, layers, image_size=None):
    """The side (min of h, w) of each layer's Grad-CAM grid for image_size px inputs (default:
    the model's): one forward pass of a blank image, stopped after the last of `layers`."""
    if image_size is None:
        from eval_zeroshot import image_size_of  # lazy: a sibling of this project
        image_size = image_size_of(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    sides = {}

    def record(module, inputs, output):
        sides[module] = min(_as_grid(output).shape[-2:])
        if len(sides) == len(layers):
            raise _Stop

    handles = [m.register_forward_hook(record) for m in layers]
    was_training = model.training
    try:
        model.eval()  # BatchNorm's running statistics stay as they are
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, image_size, image_size, device=_device(model),
                                           dtype=dtype))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [sides.get(m, 0) for m in layers]  # 0: not on the image path


def cam_layer(model, image_size=None):
    """The default Grad-CAM layer of model.visual for image_size px inputs (default: the model's).

    Rule: the deepest candidate (cam_candidates) whose grid is at least MIN_SIDE = 7 per side
    (the most semantic map that still resolves objects), else the finest one: RN50 at 224 px keeps
    layer4 (7 x 7), tiny-rn at 64 px gets layer2 (8 x 8; its layer4 is 2 x 2).
    """
    layers = cam_candidates(model)
    if len(layers) == 1:
        return layers[0]
    sides = map_sides(model, layers, image_size)
    fine = [m for m, side in zip(layers, sides) if side >= MIN_SIDE]
    return fine[-1] if fine else layers[sides.index(max(sides))]


def _as_grid(a):
    """Layer output -> (B, C, h, w): conv maps as they are, ViT tokens (B, 1 + N, W) reshaped."""
    if a.dim() == 4:
        return a
    if a.dim() != 3:
        raise ValueError(f"Grad-CAM layer output has shape {tuple(a.shape)}; expected "
                         f"(B, C, h, w) or ViT tokens (B, 1 + N, W)")
    B, L, W = a.shape
    g = round((L - 1) ** 0.5)
    if g * g != L - 1:
        raise ValueError(f"{L} tokens are not a class token + a square grid of patches "
                         f"(ToMe or patch dropout active?)")
    return a[:, 1:].transpose(1, 2).reshape(B, W, g, g)  # (B, W, g, g)


def grad_cam(model, images, z_txt, layer=None, size=None):
    """Grad-CAM maps of s = z_img . normalize(z_txt), one text per image.

    images (B, 3, R, R) preprocessed as the model expects; z_txt (B, D) text embeddings (any norm).
    Returns (B, size, size) maps in [0, 1] (size defaults to R), each divided by its maximum; an
    image without positive evidence gives zeros, never NaN. The model is used in eval mode.
    """
    layer = layer if layer is not None else cam_layer(model, images.shape[-1])
    saved = {}

    def hook(module, inputs, output):
        if not output.requires_grad:  # a locked tower: the map still needs dA
            output = output.detach().requires_grad_(True)
        saved["A"] = output
        return output

    visual = model.visual
    tome_r = getattr(visual, "tome_r", 0)
    was_training = model.training
    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        if tome_r:
            visual.tome_r = 0
        with torch.enable_grad():
            z_img = model.encode_image(images).float()  # (B, D)
            t = F.normalize(z_txt.detach().to(z_img), dim=-1)  # (B, D)
            s = (z_img * t).sum(-1)  # (B,) images are independent in eval mode: sum is fine
            grad, = torch.autograd.grad(s.sum(), saved["A"])
    finally:
        handle.remove()
        if tome_r:
            visual.tome_r = tome_r
        model.train(was_training)
    A, G = _as_grid(saved["A"].detach().float()), _as_grid(grad.float())  # (B, C, h, w) each
    alpha = G.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((alpha * A).sum(1, keepdim=True))  # (B, 1, h, w)
    size = size or images.shape[-1]
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)  # (B, size, size)


def peak(cam, tol=1e-6):
    """(B, H, W) maps -> (B, 2) long (row, col) of each maximum; ties: the one nearest the
    centre (then the first in raster order)."""
    B, H, W = cam.shape
    top = cam >= cam.amax(dim=(1, 2), keepdim=True) - tol  # (B, H, W)
    rows = torch.arange(H, dtype=torch.float32)[:, None] - (H - 1) / 2
    cols = torch.arange(W, dtype=torch.float32)[None, :] - (W - 1) / 2
    dist = (rows ** 2 + cols ** 2).expand(B, H, W).masked_fill(~top, float("inf"))
    flat = dist.reshape(B, -1).argmin(dim=1)  # (B,)
    return torch.stack([flat // W, flat % W], dim=1)


# ------------------------------------------------------------------------------- pointing game

def text_embeddings(model, tokenizer, texts, batch_size=256):
    """(T, D) float text embeddings of a list of strings, in eval mode and without gradients."""
    from eval_zeroshot import context_length_of, eval_mode  # lazy: siblings of this project

    out = []
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(texts), batch_size):
            ids = tokenizer(texts[i:i + batch_size], context_length=context_length_of(model))
            out.append(model.encode_text(ids.to(_device(model))).float())  # (b, D)
    return torch.cat(out)


def _device(model):
    return next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))


def dilate(masks, radius):
    """(B, H, W) bool masks grown by `radius` px (a disc): the pixels within radius of each."""
    if radius <= 0:
        return masks
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disc = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()[None, None]
    grown = F.conv2d(masks[:, None].float(), disc, padding=radius)[:, 0]  # (B, H, W)
    return grown > 0


def pointing_game(model, tokenizer, dataset, n=None, batch_size=64, layer=None, tolerance=None):
    """Pointing game on a dataset with classnames, templates, label(i) and mask(i) (the built-in
    SyntheticCaptions): is the CAM peak for the image's class (prompt-ensembled zero-shot
    embedding) on the object's mask (> 0), up to `tolerance` px? Zhang et al. count a peak
    within 15 px of the object as a hit, on images of a few hundred px; the default scales that
    to the image: 15 px at 224, 4 px at 64. Returns {"pointing" (with the tolerance),
    "on_object" (no tolerance), "chance" (a random point: the mean area fraction of the grown
    masks), "centre" (the image centre, where a flat map points, with the same tolerance),
    "tolerance", "n"}."""
    from views import eval_transform  # lazy: this file imports without views.py
    from eval_zeroshot import image_size_of, model_dtype, zero_shot_classifier

    n = len(dataset) if n is None else n
    if not 0 < n <= len(dataset):
        raise ValueError(f"pointing game: n={n} but the dataset has {len(dataset)} images")
    R = image_size_of(model)
    if getattr(dataset, "image_size", R) != R:
        raise ValueError(f"pointing game: the dataset's images are {dataset.image_size} px, the "
                         f"model's input {R} px: build the dataset with image_size={R}")
    tolerance = round(15 * R / 224) if tolerance is None else tolerance
    device, dtype = _device(model), model_dtype(model)
    w = zero_shot_classifier(model, tokenizer, dataset.classnames, dataset.templates,
                             device=device)  # (D, C)
    layer = layer if layer is not None else cam_layer(model, R)
    transform = eval_transform(R)
    centre = peak(torch.zeros(1, R, R))[0]  # where a flat map points
    counts = dict.fromkeys(("pointing", "on_object", "chance", "centre"), 0.0)
    for start in range(0, n, batch_size):
        index = range(start, min(n, start + batch_size))
        images = torch.stack([transform(dataset[i][0]) for i in index]).to(device, dtype)
        labels = torch.tensor([dataset.label(i) for i in index], device=device)
        masks = torch.stack([torch.as_tensor(dataset.mask(i)) > 0 for i in index])  # (b, R, R)
        near = dilate(masks, tolerance)  # (b, R, R)
        p = peak(grad_cam(model, images, w.T[labels], layer=layer).cpu())  # (b, 2)
        rows = torch.arange(len(p))
        counts["pointing"] += near[rows, p[:, 0], p[:, 1]].sum().item()
        counts["on_object"] += masks[rows, p[:, 0], p[:, 1]].sum().item()
        counts["chance"] += near.float().mean(dim=(1, 2)).sum().item()
        counts["centre"] += near[:, centre[0], centre[1]].sum().item()
    return {**{k: v / n for k, v in counts.items()}, "tolerance": tolerance, "n": n}


def format_pointing(result):
    return (f"pointing game {100 * result['pointing']:.1f}% within {result['tolerance']} px "
            f"(on the object {100 * result['on_object']:.1f}%; chance "
            f"{100 * result['chance']:.1f}%, image centre {100 * result['centre']:.1f}%, "
            f"n={result['n']})")


# ------------------------------------------------------------------------------------- drawing

def heat_colours(cam):
    """(H, W) map in [0, 1] -> (H, W, 3) uint8, blue -> cyan -> green -> yellow -> red ('jet')."""
    x = np.asarray(cam, np.float32)[..., None]
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (255 * np.concatenate([r, g, b], axis=-1)).astype(np.uint8)


def overlay(image, cam, size, weight=0.5):
    """The image (PIL) at size x size with the heat map of cam (H, W) blended over it."""
    base = image.convert("RGB").resize((size, size), Image.BICUBIC)
    heat = Image.fromarray(heat_colours(cam)).resize((size, size), Image.BILINEAR)
    return Image.blend(base, heat, weight)


def draw_grid(images, captions, maps, names, path, per_row=4, tile=128, title=""):
    """A Fig. 8-like grid: per image, the image and one overlay per model, its caption below.

    images: PIL images; captions: strings; maps: one (B, H, W) tensor per model; names: one label
    per model. Writes a PNG to path.
    """
    pad, text_h, head = 8, 48, 44
    per_row = min(per_row, len(images))
    group_w = tile * (1 + len(maps)) + pad
    rows = (len(images) + per_row - 1) // per_row
    W = per_row * group_w + pad
    H = head + rows * (tile + text_h + 20) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), title, fill=(20, 20, 20), font=font(15))
    draw.text((pad, 24), "columns: image | " + " | ".join(names), fill=(90, 90, 90),
              font=font(12))
    for k, (image, caption) in enumerate(zip(images, captions)):
        x = pad + (k % per_row) * group_w
        y = head + (k // per_row) * (tile + text_h + 20)
        canvas.paste(image.convert("RGB").resize((tile, tile), Image.BICUBIC), (x, y))
        for m, cams in enumerate(maps):
            canvas.paste(overlay(image, cams[k], tile), (x + tile * (m + 1), y))
        lines = textwrap.wrap(caption, width=max(10, group_w // 7))[:3]
        for j, line in enumerate(lines):
            draw.text((x, y + tile + 4 + 15 * j), line, fill=(20, 20, 20), font=font(12))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


# ------------------------------------------------------------------------------------ command line

def preprocess(image, size):
    """OpenAI's eval preprocessing (views.eval_transform), keeping the crop for drawing:
    (RGB PIL size x size, (3, size, size) tensor)."""
    from views import OPENAI_MEAN, OPENAI_STD  # lazy: this file imports without views.py
    from torchvision.transforms import functional as TF

    crop = TF.center_crop(TF.resize(image.convert("RGB"), size,
                                    interpolation=TF.InterpolationMode.BICUBIC), size)
    return crop, TF.normalize(TF.to_tensor(crop), OPENAI_MEAN, OPENAI_STD)


def model_maps(model, tokenizer, images, captions, layer=None):
    """(B, R, R) maps of one model for PIL images and their captions."""
    from eval_zeroshot import image_size_of, model_dtype

    R = image_size_of(model)
    x = torch.stack([preprocess(im, R)[1] for im in images]).to(_device(model), model_dtype(model))
    z_txt = text_embeddings(model, tokenizer, captions)  # (B, D)
    layer = layer if layer is not None else cam_layer(model, R)
    return grad_cam(model, x, z_txt, layer=layer).cpu()


def read_images(paths, texts):
    """(RGB PIL images, one caption each) from --images and --texts (one text, or one per image)."""
    texts = texts or []
    if len(texts) not in (1, len(paths)):
        raise ValueError(f"--texts: give one text per image ({len(paths)}) or one for all, "
                         f"not {len(texts)}")
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--images {path}: cannot read it ({type(e).__name__})") from None
    return images, texts * len(images) if len(texts) == 1 else texts


def builtin_images(n, image_size, seed):
    """The first n built-in eval images (one per class, in class order) and their captions."""
    from builtin_data import SyntheticCaptions

    ds = SyntheticCaptions("eval", size=n, image_size=image_size, seed=seed)
    pairs = [ds[i] for i in range(n)]
    return [im for im, _ in pairs], [c for _, c in pairs]


def get_layer(model, name):
    if name is None:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"--layer {name}: no such module in the model (e.g. visual.layer3, "
                         f"visual.transformer.resblocks.1.ln_1)") from None


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Grad-CAM of the image-text similarity (DeCLIP "
                                            "Fig. 8) and the pointing game on the built-in data.")
    p.add_argument("--checkpoint", required=True, help="ours, OpenAI (JIT/state dict) or OpenCLIP")
    p.add_argument("--compare", default=None, help="a second checkpoint, drawn beside the first")
    p.add_argument("--dataset", default="builtin", choices=["builtin"],
                   help="images and captions to draw when --images is not given")
    p.add_argument("--images", nargs="+", default=None, help="image files to draw")
    p.add_argument("--texts", nargs="+", default=None, help="one text per image, or one for all")
    p.add_argument("--n", type=int, default=8, help="builtin: images to draw")
    p.add_argument("--data-seed", type=int, default=0, help="builtin: which built-in dataset")
    p.add_argument("--out", default=None, help="write the grid here (PNG)")
    p.add_argument("--pointing", action=argparse.BooleanOptionalAction, default=None,
                   help="print the pointing game on the built-in eval split (default: on, "
                        "unless --images is given)")
    p.add_argument("--pointing-n", type=int, default=420, help="eval images for the pointing game")
    p.add_argument("--layer", default=None,
                   help="Grad-CAM layer by module name, e.g. visual.layer3 (default: the "
                        "deepest ResNet stage whose map is >= 7 x 7, or the ViT's last block)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.pointing is None:  # the built-in data has object masks; your images do not
        args.pointing = not args.images
    if args.out is None and not args.pointing:
        raise SystemExit("cam.py: nothing to do: pass --out FILE.png and/or --pointing")
    return args


def main(argv=None):
    args = get_args(argv)
    from builtin_data import SyntheticCaptions
    from eval_zeroshot import image_size_of
    from factory import load_model_and_tokenizer

    images = captions = None
    names, maps = [], []
    try:
        if args.texts and not args.images:
            raise ValueError("--texts needs --images (the built-in data brings its own captions)")
        if args.images:  # read before the models are loaded, to fail fast
            images, captions = read_images(args.images, args.texts)
        for path in [args.checkpoint] + ([args.compare] if args.compare else []):
            model, tokenizer = load_model_and_tokenizer(path, args.device)
            layer = get_layer(model, args.layer)
            names.append(os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))),
                                      os.path.basename(path)))
            if args.pointing:
                ds = SyntheticCaptions("eval", size=args.pointing_n,
                                       image_size=image_size_of(model), seed=args.data_seed)
                result = pointing_game(model, tokenizer, ds, layer=layer)
                print(f"{format_pointing(result)}  ({path})")
                names[-1] += f" (pointing {100 * result['pointing']:.0f}%)"
            if args.out:
                if images is None:
                    images, captions = builtin_images(args.n, image_size_of(model),
                                                      args.data_seed)
                maps.append(model_maps(model, tokenizer, images, captions, layer))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cam.py: {e}")
    if args.out:
        source = "your images" if args.images else "the built-in eval split"
        draw_grid(images, captions, maps, names, args.out,
                  title=f"Grad-CAM of each image's caption, {source}")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
