"""Grad-CAM and the pointing game on hand-made models whose answer is known, and the real towers."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import cam
import factory

S = 64  # image side of the hand-made cases
RED, BLUE, GREY = (230, 20, 20), (20, 20, 230), (128, 128, 128)


class ColourDetectors(nn.Module):
    """Two 1x1 "detectors" on 4 x 4 average-pooled pixels: channel 0 red, channel 1 blue."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1., -1, -1], [-1, -1, 1]])[:, :, None, None])

    def forward(self, x):  # (B, 3, S, S) -> (B, 2, S/4, S/4)
        return F.relu(self.conv(F.avg_pool2d(x, 4)))


class ToyVisual(nn.Module):
    """layer4 (the name cam_layer looks for) -> global average pool: z_img = (redness, blueness)."""

    def __init__(self, layer4):
        super().__init__()
        self.layer4 = layer4

    def forward(self, x):
        return self.layer4(x).mean(dim=(2, 3))  # (B, 2)


class ToyCLIP(nn.Module):
    """Text i of `texts` embeds to row i of `table`; the image tower is `visual`."""

    def __init__(self, visual, table):
        super().__init__()
        self.visual = visual
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))
        self.config = {"context_length": 4, "image_resolution": S}

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, ids):
        return self.table[ids[:, 0]]


class ToyTokenizer:
    def __init__(self, texts):
        self.index = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts, context_length=77):
        ids = torch.zeros(len(texts), context_length, dtype=torch.long)
        ids[:, 0] = torch.tensor([self.index[t] for t in texts])
        return ids


def scene(squares):
    """A grey S x S image with 16 x 16 squares {(row, col) of a 4 x 4 grid: colour}."""
    pixels = np.full((S, S, 3), GREY, np.uint8)
    for (r, c), colour in squares.items():
        pixels[16 * r:16 * r + 16, 16 * c:16 * c + 16] = colour
    return Image.fromarray(pixels)


def normalised(image):
    return cam.preprocess(image, S)[1]


def cell_of(p, size=S, grid=4):
    return (p[0].item() * grid // size, p[1].item() * grid // size)


def test_peak_lands_on_the_region_the_text_names():
    model = ToyCLIP(ToyVisual(ColourDetectors()), [[1., 0], [0, 1]])  # "red", "blue"
    x = normalised(scene({(0, 3): RED, (2, 1): BLUE})).expand(2, -1, -1, -1)
    maps = cam.grad_cam(model, x, model.table)  # image 0 with "red", image 1 with "blue"
    assert maps.shape == (2, S, S)
    peaks = cam.peak(maps)
    assert cell_of(peaks[0]) == (0, 3) and cell_of(peaks[1]) == (2, 1)
    assert maps[0, 16 * 2:16 * 3, 16:32].max() == 0  # no red evidence on the blue square


class OnePosition(nn.Module):
    """A tower that reads the layer's features at one position only: z_img = A[:, :, i, j]."""

    def __init__(self, i, j):
        super().__init__()
        self.layer4, self.i, self.j = nn.Identity(), i, j

    def forward(self, x):
        return self.layer4(x)[:, :, self.i, self.j]  # (B, C)


def test_model_reading_one_position_peaks_there_despite_noise_elsewhere():
    # 64 random channels on an 8 x 8 grid: only position (2, 5) reaches the embedding. The cosine's
    # gradient is orthogonal to A[:, :, 2, 5], so its evidence there is 0 (checked below).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 8, 8, generator=g)
    model = ToyCLIP(OnePosition(2, 5), x[:, :, 2, 5] + torch.randn(1, 64, generator=g))
    maps = cam.grad_cam(model, x, model.table, size=S)
    assert maps.max() == 1
    assert cell_of(cam.peak(maps)[0], grid=8) == (2, 5)
    # why not the cosine: its Grad-CAM evidence at the one position that counts is 0
    A = x.clone().requires_grad_(True)
    G, = torch.autograd.grad(F.cosine_similarity(model.encode_image(A), model.table).sum(), A)
    evidence = (G.mean(dim=(2, 3), keepdim=True) * A).sum(1)  # (1, 8, 8) before the ReLU
    assert abs(evidence[0, 2, 5].item()) < 1e-6 < evidence.abs().max().item()


def test_constant_image_gives_a_flat_map_without_nan():
    model = ToyCLIP(ToyVisual(ColourDetectors()), [[1., 0]])
    for colour in (RED, GREY):  # positive evidence everywhere / none anywhere
        maps = cam.grad_cam(model, normalised(Image.new("RGB", (S, S), colour))[None],
                            model.table)
        assert torch.isfinite(maps).all() and maps.max() - maps.min() < 1e-6  # rounding only
    # a real tower: zero padding makes the borders differ, but never NaN
    torch.manual_seed(0)
    tiny = factory.create_model("tiny-rn", vocab_size=515, transformer_layers=1)
    maps = cam.grad_cam(tiny, torch.zeros(2, 3, 64, 64), torch.randn(2, 128))
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("name,overrides,grid", [
    ("tiny-rn", {}, 8),                              # ModifiedResNet at 64 px: layer2 at R/8
    ("tiny", {}, 8),                                 # ViT: 8 x 8 patches entering the last block
    ("tiny", {"tome_r": 4}, 8),                      # ToMe is switched off for the map
    ("tiny-rn", {"image_tower": dict(kind="tv-resnet18", arch="resnet18", output_dim=128,
                                     input_resolution=64)}, 8),  # torchvision's (pretrained.py)
])
def test_shapes_and_range_on_every_tower(name, overrides, grid):
    torch.manual_seed(0)
    config = {**factory.PRESETS[name], "vocab_size": 515, "transformer_layers": 1, **overrides}
    model = factory.from_config(config).train()  # module towers (pretrained.py) too
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        z_own = model.eval().encode_image(images)  # the text "is" the image: positive evidence
    model.train()
    seen = []
    handle = cam.cam_layer(model).register_forward_hook(
        lambda m, i, o: seen.append(cam._as_grid(o).shape))
    maps = cam.grad_cam(model, images, z_own)
    handle.remove()
    assert seen[0][-2:] == (grid, grid)
    assert maps.shape == (3, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    peaks = maps.amax(dim=(1, 2))  # 1, or 0 without positive evidence (random weights can)
    assert torch.isfinite(maps).all() and ((peaks == 1) | (peaks == 0)).all()
    assert model.training and getattr(model.visual, "tome_r", 0) == overrides.get("tome_r", 0)
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


@pytest.mark.parametrize("resolution,stage,side", [
    (64, "layer2", 8),     # layer4 would be 2 x 2, layer3 4 x 4: both under 7
    (128, "layer3", 8),    # layer4 4 x 4
    (224, "layer4", 7),    # RN50's input: the last block, as in Grad-CAM and DeCLIP's Fig. 8
])
def test_default_layer_is_the_deepest_with_a_map_of_at_least_7(resolution, stage, side):
    torch.manual_seed(0)
    model = factory.create_model("tiny-rn", vocab_size=515, transformer_layers=1,
                                 image_resolution=resolution).train()
    layer = cam.cam_layer(model)
    assert layer is getattr(model.visual, stage) and model.training  # the probe restores train
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    maps = cam.grad_cam(model, torch.randn(1, 3, resolution, resolution), torch.randn(1, 128))
    handle.remove()
    assert seen[-1] == (side, side) and maps.shape == (1, resolution, resolution)  # used


def test_default_layer_follows_the_input_size():
    torch.manual_seed(0)
    model = factory.create_model("tiny-rn", vocab_size=515, transformer_layers=1)  # 64 px
    assert cam.map_sides(model, cam.cam_candidates(model)) == [16, 8, 4, 2]
    assert cam.cam_layer(model, 32) is model.visual.layer1  # 8 x 8 (layer2 4 x 4)
    assert cam.cam_layer(model, 128) is model.visual.layer3  # 8 x 8 (layer4 4 x 4)


def test_default_layer_when_every_map_is_coarse():
    visual = nn.Module()
    visual.layer1, visual.layer2 = nn.AvgPool2d(16), nn.AvgPool2d(2)  # 4 x 4, 2 x 2 at 64 px
    visual.forward = lambda x: visual.layer2(visual.layer1(x)).flatten(1)
    model = ToyCLIP(visual, [[1., 0, 0]])
    assert cam.cam_layer(model) is visual.layer1  # none is 7 x 7: the finest


def test_dilate_grows_masks_by_a_disc():
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 4, 4] = True
    grown = cam.dilate(mask, 2)[0]
    assert grown.sum() == 13  # the pixels within distance 2: 1 + 4 + 4 + 4
    assert grown[4, 6] and grown[5, 5] and not grown[6, 6] and not grown[4, 7]
    assert torch.equal(cam.dilate(mask, 0), mask)


def test_peak_ties_go_to_the_centre():
    flat = torch.zeros(1, 5, 7)
    assert cam.peak(flat).tolist() == [[2, 3]]
    plateau = torch.zeros(1, 6, 6)
    plateau[0, :3, :3] = 1  # a coarse map's corner plateau: its pixel nearest the centre
    assert cam.peak(plateau).tolist() == [[2, 2]]


class ToyDataset:
    """Built-in-like: 4 images, one red and one blue square each; masks chosen to hit or miss."""

    classnames, templates, image_size = ["red", "blue"], ["{c}"], S

    def __init__(self):
        # (red cell, blue cell, label, cell the mask covers): hit, miss, hit, miss
        self.items = [((0, 0), (3, 3), 0, (0, 0)), ((1, 2), (1, 1), 0, (1, 1)),
                      ((2, 2), (0, 1), 1, (0, 1)), ((3, 1), (1, 1), 1, (3, 1))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        red, blue, _, _ = self.items[i]
        return scene({red: RED, blue: BLUE}), "a caption"

    def label(self, i):
        return self.items[i][2]

    def mask(self, i):
        r, c = self.items[i][3]
        m = np.zeros((S, S), np.int64)
        m[16 * r:16 * r + 16, 16 * c:16 * c + 16] = 1
        return m


def test_pointing_game_on_a_known_case():
    model = ToyCLIP(ToyVisual(ColourDetectors()), [[1., 0], [0, 1]])
    result = cam.pointing_game(model, ToyTokenizer(["red", "blue"]), ToyDataset(), batch_size=3,
                               tolerance=0)
    # the centre pixel (31, 31) is in cell (1, 1): only image 1's mask covers it
    assert result == {"pointing": 0.5, "on_object": 0.5, "chance": 1 / 16, "centre": 0.25,
                      "tolerance": 0, "n": 4}
    near = cam.pointing_game(model, ToyTokenizer(["red", "blue"]), ToyDataset(), tolerance=2)
    assert near["on_object"] == 0.5 and near["tolerance"] == 2  # the misses are cells away
    # a 16 px square grown by a disc of radius 2: 2 px strips on its free sides, 1 px corners
    grown = [256 + 2 * 32 + 1, 256 + 4 * 32 + 4, 256 + 3 * 32 + 2, 256 + 3 * 32 + 2]
    assert near["chance"] == pytest.approx(sum(grown) / 4 / 64 ** 2)
    assert cam.pointing_game(model, ToyTokenizer(["red", "blue"]), ToyDataset())["tolerance"] \
        == round(15 * 64 / 224)  # Zhang et al.'s 15 px at 224, scaled to the image
    assert cam.pointing_game(model, ToyTokenizer(["red", "blue"]), ToyDataset(), n=1)["pointing"] \
        == 1.0
    with pytest.raises(ValueError, match="n=5"):
        cam.pointing_game(model, ToyTokenizer(["red", "blue"]), ToyDataset(), n=5)


def test_heat_colours_and_grid(tmp_path):
    colours = cam.heat_colours(np.array([[0.0, 0.5, 1.0]]))
    assert colours.shape == (1, 3, 3) and colours.dtype == np.uint8
    assert colours[0, 0, 2] > colours[0, 0, 0] and colours[0, 2, 0] > colours[0, 2, 2]  # blue, red
    images = [scene({(0, 0): RED}), scene({(1, 1): BLUE})]
    maps = torch.rand(2, S, S)
    cam.draw_grid(images, ["red square", "blue square"], [maps, maps], ["a", "b"],
                  tmp_path / "g.png", per_row=2, tile=32)
    out = Image.open(tmp_path / "g.png")
    assert out.width == 2 * (32 * 3 + 8) + 8


def test_cli_grid_compare_and_pointing(tmp_path, capsys, tiny_checkpoint):
    ckpt = tiny_checkpoint
    out = tmp_path / "cam.png"
    cam.main(["--checkpoint", str(ckpt), "--compare", str(ckpt), "--n", "2", "--out", str(out),
              "--pointing", "--pointing-n", "4", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert printed.count("pointing game ") == 2 and "chance" in printed
    assert Image.open(out).size == (2 * (3 * 128 + 8) + 8, 44 + 128 + 48 + 20 + 8)  # 2 + 2
    scene({(0, 0): RED}).save(tmp_path / "a.png")
    cam.main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "a.png"), "--texts", "red",
              "--layer", "visual.layer3", "--out", str(out), "--device", "cpu"])
    for argv, message in ((["--out", str(out), "--texts", "x"], "--texts needs --images"),
                          (["--no-pointing"], "nothing to do"),
                          (["--images", str(tmp_path / "a.png"), "--texts", "red"],
                           "nothing to do"),  # no masks for your images: no pointing game
                          (["--pointing", "--layer", "visual.nope"], "--layer visual.nope"),
                          (["--images", "no.jpg", "--texts", "x", "--out", str(out)], "no.jpg")):
        with pytest.raises(SystemExit, match=message):
            cam.main(["--checkpoint", str(ckpt), "--device", "cpu"] + argv)


def test_cli_builtin_prints_the_pointing_game_by_default(capsys, tiny_checkpoint):
    cam.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "builtin", "--pointing-n", "4",
              "--device", "cpu"])
    printed = capsys.readouterr().out
    assert printed.startswith("pointing game ") and "centre" in printed and "n=4" in printed
