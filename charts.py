"""Small PNG charts with Pillow alone (no matplotlib): fonts, a line chart, and bars or points
with 95% intervals over seeds.

    from charts import line_chart
    line_chart({"top-1": [(100, 0.31), (200, 0.74)]}, "accuracy.png", "Zero-shot accuracy",
               x_label="step", y_label="%", y_scale=100)

The interval charts take summaries as study.summarize makes them: {"mean", "ci95", "max",
"values"} of a fraction (an accuracy), drawn in % (scale 100).
"""
import math
import textwrap

from PIL import Image, ImageDraw, ImageFont

INK, GRID, NOTE, DOT = (30, 30, 30), (220, 220, 220), (90, 90, 90), (20, 20, 20)
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


def interval(s):
    """The 95% interval of an accuracy, cut to [0, 1]: Student's t knows nothing of the bounds."""
    half = s["ci95"] if math.isfinite(s["ci95"]) else 0.0
    return max(0.0, s["mean"] - half), min(1.0, s["mean"] + half)


def bar_panel(draw, box, title, items, key, scale, colour, fmt):
    """Bars of items[i][key] with mean ± 95% interval and one dot per seed, labelled by
    items[i]["label"]; returns {label: bar rectangle}."""
    x0, y0, x1, y1 = box
    f, fs = font(14), font(12)
    draw.text((x0, y0), title, fill=INK, font=f)
    top, bottom, left = y0 + 28, y1 - 36, x0 + 44
    vmax = min(scale, nice_max(max(max(it[key]["max"], interval(it[key])[1])
                                    for it in items) * scale * 1.05))
    to_y = lambda v: bottom - (bottom - top) * max(0.0, v) * scale / vmax  # noqa: E731
    for k in range(6):  # horizontal grid and tick labels
        y = bottom - (bottom - top) * k / 5
        draw.line((left, y, x1, y), fill=GRID)
        draw.text((x0, y - 7), f"{vmax * k / 5:g}", fill=INK, font=fs)
    slot = (x1 - left) / len(items)
    width = slot * 0.6
    rects = {}
    for i, it in enumerate(items):
        s = it[key]
        cx = left + slot * (i + 0.5)
        rect = (round(cx - width / 2), round(to_y(s["mean"])), round(cx + width / 2), bottom)
        draw.rectangle(rect, fill=colour)
        rects[it["label"]] = rect
        lo, hi = map(to_y, interval(s))
        draw.line((cx, lo, cx, hi), fill=INK, width=2)
        for y in (lo, hi):
            draw.line((cx - 6, y, cx + 6, y), fill=INK, width=2)
        for j, v in enumerate(s["values"]):  # the seeds themselves, spread sideways
            dx = (j - (len(s["values"]) - 1) / 2) * 5
            draw.ellipse((cx + width / 4 + dx - 2, to_y(v) - 2, cx + width / 4 + dx + 2,
                          to_y(v) + 2), fill=DOT)
        draw.text((cx, min(hi, rect[1]) - 4), fmt(s["mean"] * scale), fill=INK, font=fs,
                  anchor="md")
        for k, line in enumerate(textwrap.wrap(it["label"], 14)[:2]):
            draw.text((cx, bottom + 4 + 14 * k), line, fill=INK, font=fs, anchor="ma")
    draw.line((left, bottom, x1, bottom), fill=INK)
    return rects


def bar_chart(groups, panels, path, title, note=""):
    """groups: [(group title, items)], one row each; panels: [(panel title, key, colour)], side
    by side in every row (see bar_panel). Returns {(group index, key, label): rectangle}."""
    W, row_h, head = 1300, 340, 40
    img = Image.new("RGB", (W, head + row_h * len(groups) + 24), "white")
    draw = ImageDraw.Draw(img)
    draw.text((12, 10), title, fill=INK, font=font(16))
    n = len(panels)  # n panels a row, 30 px apart
    starts = [12] + [W * k // n + 10 for k in range(1, n)]
    ends = [W * (k + 1) // n - 20 for k in range(n - 1)] + [W - 14]
    rects = {}
    for g, (group_title, items) in enumerate(groups):
        y0 = head + g * row_h
        draw.text((12, y0 + 4), group_title, fill=INK, font=font(15))
        for x0, x1, (name, key, colour) in zip(starts, ends, panels):
            for label, rect in bar_panel(draw, (x0, y0 + 30, x1, y0 + row_h - 6), name, items,
                                         key, 100, colour, lambda v: f"{v:.1f}").items():
                rects[(g, key, label)] = rect
    if note:
        draw.text((12, img.height - 20), note, fill=NOTE, font=font(12))
    img.save(path)
    return rects


def interval_curve(series, ticks, path, title, x_label, note=""):
    """Points with 95% intervals at evenly spaced categories, joined per series.

    series: {key: (legend, colour, {x: summary})}; ticks: [(x, tick label)] in axis order.
    Returns {(key, x): (px, py)} of the points drawn."""
    W, H, left, right, top, bottom = 760, 460, 70, 30, 50, 70
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((12, 10), title, fill=INK, font=font(16))
    xs = {x: left + (W - left - right) * (k + 0.5) / len(ticks) for k, (x, _) in enumerate(ticks)}
    vmax = min(100, nice_max(max(s["max"] for _, _, points in series.values()
                                 for s in points.values()) * 100 * 1.05))
    to_y = lambda v: H - bottom - (H - bottom - top) * max(0.0, v) * 100 / vmax  # noqa: E731
    for k in range(6):
        y = H - bottom - (H - bottom - top) * k / 5
        draw.line((left, y, W - right, y), fill=GRID)
        draw.text((12, y - 7), f"{vmax * k / 5:g}", fill=INK, font=font(12))
    for x, label in ticks:
        draw.text((xs[x], H - bottom + 8), label, fill=INK, font=font(12), anchor="ma")
    draw.text((W // 2, H - 28), x_label, fill=INK, font=font(12), anchor="ma")
    drawn = {}
    for k, (key, (legend, colour, points)) in enumerate(series.items()):
        pts = []
        for x, _ in ticks:
            if x not in points:
                continue
            px, py = xs[x] + (k - 0.5) * 8, to_y(points[x]["mean"])
            lo, hi = map(to_y, interval(points[x]))
            draw.line((px, lo, px, hi), fill=colour, width=2)
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
            pts.append((px, py))
            drawn[(key, x)] = (px, py)
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        draw.text((left + 10, top + 4 + 18 * k), legend, fill=colour, font=font(14))
    if note:
        draw.text((12, H - 14), note, fill=NOTE, font=font(11))
    img.save(path)
    return drawn
