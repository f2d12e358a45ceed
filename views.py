"""The image views: DeCLIP's (Appendix B), CLIP's single training view, and the eval transform.

    view = DeclipView(224)             # crop 0.2-1, colour jitter, grayscale, blur, flip
    x = view(pil_image)                # (3, 224, 224), normalised
    params = view.sample(pil_image)    # or the random draws alone,
    x = view.apply(pil_image, params)  # then their application (builtin_data.label_visible)
    x = clip_image_transform(224)(pil_image)   # CLIP's mild crop; eval_transform(224): no crop

DeclipView draws what torchvision's transforms draw, and applies it 4x cheaper than torchvision on
PIL images: the crop is resized by torch's uint8 bicubic (PIL's filter; 1-2 levels of 255 apart in
~1% of the pixels, rounding), the colour jitter runs in float on a tensor with the formulas of
torchvision's tensor backend, and the blur is a separable Gaussian (torchvision's kernel less the
taps beyond 4 sigma: < 0.07 levels). The views are thus 1.0-1.3 levels a pixel away from
torchvision's PIL path on average, which is how far torchvision's own PIL and tensor backends are
from each other (its PIL path rounds to 8 bits after every op and shifts hue in 8-bit HSV);
tests/test_data.py measures all three gaps against torchvision's ops.

Shapes: S view side. A view: PIL image -> (3, S, S) float, normalised with OpenAI's mean and std.

Left out: batched views on the GPU (the ops here run per image, in DataLoader workers).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# DeclipView's colour ops, on a (3, H, W) float tensor in [0, 255] that they change in place:
# the formulas of torchvision's tensor backend (its adjust_* functions), for one core.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601 luma)
HUE_CENTRES = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1)  # R, G, B on the hue circle of 6
MEAN_255 = torch.tensor(OPENAI_MEAN).view(3, 1, 1) * 255
STD_255 = torch.tensor(OPENAI_STD).view(3, 1, 1) * 255
BLUR_TAPS = 4.0  # the blur's taps reach 4 sigma: the rest of the kernel weighs < 7e-5


def resized_crop(image, crop, size):
    """PIL image -> its crop (top, left, height, width) resized to (3, size, size) uint8 with
    PIL's bicubic filter, as TF.resized_crop does, by torch's uint8 antialiased bicubic: 3x
    faster than PIL's, and the same pixels but for rounding (1-2 levels, in 1% of them)."""
    top, left, h, w = crop
    image = image if image.mode == "RGB" else image.convert("RGB")
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]     # (1, 3, H, W) HWC memory
    x = x[:, :, top:top + h, left:left + w]
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0]


def grayscale(x):
    """(3, H, W) -> (1, H, W): each pixel's luma, torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(0)
    l = (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])
    return l[None]


def adjust_brightness(x, factor):
    return x.mul_(factor).clamp_(0, 255)


def adjust_contrast(x, factor):
    """Towards (factor < 1) or away from the image's mean luma."""
    mean = sum(w * m for w, m in zip(GRAY_WEIGHTS, x.mean((1, 2)).tolist()))
    return x.mul_(factor).add_((1 - factor) * mean).clamp_(0, 255)


def adjust_saturation(x, factor):
    """Towards (factor < 1) or away from each pixel's luma."""
    return torch.lerp(grayscale(x), x, factor, out=x).clamp_(0, 255)


def adjust_hue(x, shift):
    """Rotate each pixel's HSV hue by `shift` turns; its HSV saturation and value stay.

    With hues in sextants (red 0, green 2, blue 4), hsv -> rgb is, for each channel,
    min + (max - min) * clamp(2 - circular distance from the hue to the channel's hue, 0, 1).
    """
    r, g, b = x.unbind(0)
    high, low = x.amax(0), x.amin(0)                                     # (H, W)
    chroma = high - low
    hue = torch.where(high == r, g - b, torch.where(high == g, torch.add(b - r, chroma, alpha=2),
                                                    torch.add(r - g, chroma, alpha=4)))
    hue = hue.div_(chroma.clamp(min=1e-3))  # [-1, 5]; a grey pixel's hue does not matter
    d = (hue + (6 * shift) % 6 - HUE_CENTRES).abs_()                     # (3, H, W), [0, 12)
    # 2 - circular distance = 2 - (3 - ||d - 6| - 3|) on [0, 12], without a remainder
    weight = d.sub_(6).abs_().sub_(3).abs_().sub_(1).clamp_(0, 1)
    return torch.addcmul(low, chroma, weight, out=x)


def gaussian_blur(x, sigma, kernel):
    """Separable Gaussian blur of (C, H, W), reflect padding: torchvision's gaussian_blur with
    its `kernel`-tap kernel, less the taps beyond BLUR_TAPS sigma. Returns a new tensor."""
    half = min(kernel // 2, int(BLUR_TAPS * sigma))
    if half == 0:
        return x
    w = torch.exp(-0.5 * (torch.arange(half + 1.0) / sigma) ** 2)
    w = (w / (2 * w.sum() - w[0])).tolist()                              # w[0]: the centre
    for dim in (2, 1):  # rows, then columns
        n = x.shape[dim]
        pad = (half, half, 0, 0) if dim == 2 else (0, 0, half, half)
        xp = F.pad(x[None], pad, mode="reflect")[0]
        x = xp.narrow(dim, half, n) * w[0]
        for t in range(1, half + 1):
            x.add_(xp.narrow(dim, half - t, n), alpha=w[t]).add_(xp.narrow(dim, half + t, n),
                                                                  alpha=w[t])
    return x


def _resized_crop_params(size, scale, ratio, u):
    """torchvision's RandomResizedCrop.get_params, drawing from the uniforms `u`."""
    width, height = size
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        area = width * height * (scale[0] + (scale[1] - scale[0]) * next(u))
        aspect = math.exp(log_lo + (log_hi - log_lo) * next(u))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(next(u) * (height - h + 1)), int(next(u) * (width - w + 1)), h, w
    w, h = width, height  # torchvision's fallback, the whole image clamped to the ratios
    if w / h < ratio[0]:
        h = round(w / ratio[0])
    elif w / h > ratio[1]:
        w = round(h * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


class DeclipView:
    """DeCLIP's image view (Appendix B; SimCLR/SimSiam's recipe with crop scale 0.2-1).

    RandomResizedCrop(scale 0.2-1, aspect ratio 3/4-4/3, bicubic) -> ColorJitter(0.4, 0.4, 0.4,
    0.1) with p 0.8 -> grayscale with p 0.2 -> Gaussian blur with p 0.5 -> horizontal flip with
    p 0.5.
    The paper gives blur's sigma range (0.1-2 px at 224 px) but not its probability: we take
    SimCLR's p = 0.5, and scale sigma and the kernel (23 px at 224, ~10% of the side) with the
    image side, so a 64 px image is blurred as much, relative to its content, as a 224 px photo.
    The random draws (`sample`) are kept apart from their application (`apply`) so that a test
    can ask what a view did to the label (builtin_data.label_visible). Draws use torch's global
    RNG, which data.ImageText reseeds per sample. `apply` is the fast path (see the module's
    docstring: 4x cheaper per core, within rounding of torchvision's float formulas).
    """

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1),
                 p_jitter=0.8, p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0), flip=True):
        self.size, self.scale, self.ratio, self.jitter, self.flip = size, scale, ratio, jitter, flip
        self.p_jitter, self.p_gray, self.p_blur = p_jitter, p_gray, p_blur
        self.sigma = (sigma[0] * size / 224, sigma[1] * size / 224)
        self.kernel = int(0.1 * size) // 2 * 2 + 1

    def sample(self, image):
        """The random choices of one view of `image` (PIL), as a dict: the distributions of
        torchvision's RandomResizedCrop, ColorJitter, RandomGrayscale, GaussianBlur and
        RandomHorizontalFlip, from one call to torch's RNG (their get_params make ~20 calls,
        0.35 ms a view)."""
        u = iter(torch.rand(36, dtype=torch.float64).tolist())  # enough for every draw
        crop = _resized_crop_params(image.size, self.scale, self.ratio, u)  # i, j, h, w
        jitter = None
        if next(u) < self.p_jitter:
            keys = [next(u) for _ in range(4)]
            order = sorted(range(4), key=keys.__getitem__)  # a uniform random permutation
            jitter = (order, *(1 - f + 2 * f * next(u) for f in self.jitter[:3]),
                      self.jitter[3] * (2 * next(u) - 1))  # order, brightness, ..., hue
        gray = next(u) < self.p_gray
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * next(u)
        sigma = sigma if next(u) < self.p_blur else None
        flip = self.flip and next(u) < 0.5
        return dict(crop=crop, jitter=jitter, gray=gray, sigma=sigma, flip=flip)

    def apply(self, image, params):
        """PIL image -> normalised (3, size, size) tensor, as `params` say."""
        x = resized_crop(image, params["crop"], self.size)               # (3, S, S) uint8
        if params["flip"]:  # here rather than last: the later ops commute with it (to rounding)
            x = x.flip(-1)
        x = torch.empty(x.shape).copy_(x)                                  # float, 0-255
        if params["jitter"] is not None:
            order, *factors = params["jitter"]
            adjust = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
            for k in map(int, order):
                x = adjust[k](x, float(factors[k]))
        if params["gray"]:
            x = grayscale(x)                                               # (1, S, S)
        if params["sigma"] is not None:
            x = gaussian_blur(x, params["sigma"], self.kernel)
        return (x - MEAN_255).div_(STD_255)                                # (3, S, S)

    def __call__(self, image):
        return self.apply(image, self.sample(image))


def clip_image_transform(size):
    """CLIP's single training view as in OpenCLIP: a mild random resized crop."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


def eval_transform(size):
    """OpenAI's preprocessing: shorter side to `size` (bicubic), centre crop."""
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])
