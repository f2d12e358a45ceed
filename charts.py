"""Small PNG charts with Pillow alone (no matplotlib): the fonts and a line chart.

    from charts import line_chart
    line_chart({"top-1": [(100, 0.31), (200, 0.74)]}, "accuracy.png", "Zero-shot accuracy",
               x_label="step", y_label="%", y_scale=100)
"""
import math

from PIL import Image, ImageDraw, ImageFont

INK, GRID, NOTE = (30, 30, 30), (220, 220, 220), (90, 90, 90)
PALETTE = [(200, 60, 50), (70, 110, 190), (225, 140, 50), (60, 150, 90), (120, 80, 160)]


def font(size):
    """Pillow's default font at `size` px (the fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def nice_max(x):
    """A round axis maximum >= x (1, 2, 2.5, 5 x 10^k)."""
    if x <= 0:
        return 1.0
    k = 10 ** math.floor(math.log10(x))
    return next(m * k for m in (1, 2, 2.5, 5, 10) if m * k >= x)


def line_chart(series, path, title, x_label="", y_label="", y_scale=1.0, y_max=None, note=""):
    """series: {name: [(x, y), ...]}, one coloured line with dots each; y is multiplied by
    y_scale on the axis (100 for fractions shown as %). Returns {name: [(px, py), ...]}."""
    W, H, left, right, top, bottom = 760, 440, 64, 24, 48, 64
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((12, 10), title, fill=INK, font=font(16))
    points = [p for pts in series.values() for p in pts]
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    x_lo = 0 if x_lo >= 0 else x_lo
    v_max = y_max or nice_max(max(y for _, y in points) * y_scale * 1.05)
    to_x = lambda x: left + (W - left - right) * (x - x_lo) / max(1e-9, x_hi - x_lo)  # noqa: E731
    to_y = lambda y: H - bottom - (H - bottom - top) * y * y_scale / v_max  # noqa: E731
    for k in range(6):  # grid and tick labels
        y = H - bottom - (H - bottom - top) * k / 5
        draw.line((left, y, W - right, y), fill=GRID)
        draw.text((left - 8, y), f"{v_max * k / 5:g}", fill=INK, font=font(12), anchor="rm")
        x = left + (W - left - right) * k / 5
        draw.text((x, H - bottom + 6), f"{x_lo + (x_hi - x_lo) * k / 5:g}", fill=INK,
                  font=font(12), anchor="ma")
    draw.text((W // 2, H - 30), x_label, fill=INK, font=font(12), anchor="ma")
    draw.text((12, top - 18), y_label, fill=INK, font=font(12))
    drawn = {}
    for k, (name, pts) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        xy = [(to_x(x), to_y(y)) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.text((left + 12, top + 4 + 18 * k), name, fill=colour, font=font(14))
        drawn[name] = xy
    if note:
        draw.text((12, H - 16), note, fill=NOTE, font=font(11))
    img.save(path)
    return drawn
