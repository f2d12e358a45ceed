"""Data-pipeline benchmarks of bench.py (`python experiments/bench.py --only views,index`).

- views: the data pipeline per core, on 256 px JPEGs in an img2dataset-style tar it writes:
         decoding, EDA, CLIP's view, DeCLIP's view (torchvision on PIL images, as before, and
         views.DeclipView's tensor path, the same draws), and whole samples as ImageText makes
         them. CPU seconds of this process with one torch thread, so other load on the machine
         slows every row alike.
- index: the shard index (shards.ShardDataset) on tiny samples in pax tars as img2dataset writes
         them: building, opening, private and shared memory, extrapolated to 88M pairs
         (DeCLIP's largest set).
"""
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch

# the library modules (clip.py, train.py, ...) live at the repo root, one folder up
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def photo_jpeg(rng, side=256):
    """A stand-in for a web photo: smooth colour gradients and noise, JPEG quality 90 (~30 KB
    at 256 px, the size img2dataset writes for CC3M)."""
    from PIL import Image
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([np.sin(x * rng.uniform(2, 9) + y * rng.uniform(-5, 5) + rng.uniform(0, 6))
                    for _ in range(3)], -1) * 90 + 128 + rng.normal(0, 15, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, samples):
    """img2dataset's layout, KEY.jpg + KEY.txt + KEY.json, written as webdataset's TarWriter
    writes it: pax format with a float mtime, hence a pax header before every member."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, jpg, caption in samples:
            for ext, payload in (("jpg", jpg), ("txt", caption.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(payload), time.time()
                tar.addfile(info, io.BytesIO(payload))


def torchvision_draws(view, image):
    """views.DeclipView's draws as they were made before: torchvision's get_params, one call to
    torch's RNG a number (DeclipView.sample draws the same distributions in one call)."""
    from torchvision import transforms as T
    crop = T.RandomResizedCrop.get_params(image, view.scale, (3 / 4, 4 / 3))
    b, c, s, h = view.jitter
    jitter = (T.ColorJitter.get_params([1 - b, 1 + b], [1 - c, 1 + c], [1 - s, 1 + s], [-h, h])
              if torch.rand(()) < view.p_jitter else None)
    gray = bool(torch.rand(()) < view.p_gray)
    sigma = T.GaussianBlur.get_params(*view.sigma) if torch.rand(()) < view.p_blur else None
    return dict(crop=crop, jitter=jitter, gray=gray, sigma=sigma,
                flip=view.flip and bool(torch.rand(()) < 0.5))


def torchvision_view(view, image, params, pil=True):
    """DeCLIP's view with the same draws, applied by torchvision's ops: on PIL images with 8 bits
    after every op (pil=True: the path views.DeclipView.apply replaced, 4x slower), or in float
    on the tensor DeclipView crops (pil=False: the formulas DeclipView.apply implements). The
    reference of tests/test_data.py and of this benchmark's "before" rows."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF
    import views
    if pil:
        x = TF.resized_crop(image, *params["crop"], [view.size, view.size],
                            T.InterpolationMode.BICUBIC)
    else:
        x = views.resized_crop(image, params["crop"], view.size).float() / 255
    if params["jitter"] is not None:
        order, *factors = params["jitter"]
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for k in map(int, order):
            x = adjust[k](x, factors[k])
    if params["gray"]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params["sigma"] is not None:
        x = TF.gaussian_blur(x, [view.kernel] * 2, [params["sigma"]] * 2)
    if params["flip"]:
        x = TF.hflip(x)
    return TF.normalize(TF.to_tensor(x) if pil else x, views.OPENAI_MEAN, views.OPENAI_STD)


def cpu_interleaved(fns, n, rounds):
    """Median over rounds of the CPU seconds of this process that each fn(round, i) takes for
    i < n; the fns take turns item by item, so that other load on the machine hits all alike."""
    times = {k: [] for k in fns}
    for r in range(rounds):
        total = dict.fromkeys(fns, 0.0)
        for i in range(n):
            for k, fn in fns.items():
                t = time.process_time()
                fn(r, i)
                total[k] += time.process_time() - t
        for k in fns:
            times[k].append(total[k])
    return {k: statistics.median(v) for k, v in times.items()}


def bench_views(size, n=48, rounds=5):
    """Per core: decoding, EDA, one view, and whole samples as data.ImageText makes them."""
    import data
    import eda
    import shards
    import views
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    rng = np.random.default_rng(0)
    captions = [data.SyntheticCaptions(seed=1).caption(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        write_shard(os.path.join(folder, "00000.tar"),
                    [(f"{i:09d}", photo_jpeg(rng), captions[i]) for i in range(n)])
        base = shards.ShardDataset(folder, index_dir=folder)
        images = [base[i][0] for i in range(n)]
        kb = os.path.getsize(os.path.join(folder, "00000.tar")) / n / 1024
        view, clip_view = views.DeclipView(size), views.clip_image_transform(size)

        def before(image):  # before: torchvision's draws and ops on PIL images
            return torchvision_view(view, image, torchvision_draws(view, image))

        def one_view(transform):
            def run(r, i):
                torch.default_generator.manual_seed(r * n + i)  # the same draws for all
                transform(images[i])
            return run

        def sample(transform, n_views, text_aug):
            datasets = [data.ImageText(base, transform, views=n_views, text_aug=text_aug)]

            def run(r, i):
                datasets[0].set_epoch(r)  # the same draws for the same (epoch, index)
                datasets[0][i]
            return run
        before_view = "DeCLIP's view, before (torchvision on PIL)"
        before_sample = "DeCLIP sample, before (decode + 2 views + EDA)"
        rows = {
            "read + decode a JPEG": (lambda r, i: base[i], None),
            "EDA, one caption": (lambda r, i: eda.augment(captions[i], random.Random(r)), None),
            "CLIP's view": (one_view(clip_view), None),
            before_view: (one_view(before), None),
            "DeCLIP's view, now (DeclipView)": (one_view(view), before_view),
            "CLIP sample (decode + 1 view)": (sample(clip_view, 1, None), None),
            before_sample: (sample(before, 2, eda.augment), None),
            "DeCLIP sample, now": (sample(view, 2, eda.augment), before_sample),
        }
        t = cpu_interleaved({k: fn for k, (fn, _) in rows.items()}, n, rounds)
    torch.set_num_threads(threads)
    print(f"\n## Data pipeline per core: 256 px JPEGs ({kb:.0f} KB) in a tar shard -> {size} px "
          f"views ({n} images x {rounds} rounds, median round, CPU time, 1 thread)")
    print("| step | ms (CPU) | per second per core | speed-up |")
    print("|---|---|---|---|")
    for k, (_, reference) in rows.items():
        speedup = f"{t[reference] / t[k]:.2f}x" if reference else ""
        print(f"| {k} | {t[k] / n * 1e3:.2f} | {n / t[k]:,.0f} | {speedup} |")
    clip = t["CLIP sample (decode + 1 view)"]
    print(f"A DeCLIP sample costs {t['DeCLIP sample, now'] / clip:.1f} CLIP samples (before: "
          f"{t[before_sample] / clip:.1f}).")


INDEX_PROBE = r"""
import json, os, random, re, sys, time
sys.path.insert(0, {repo!r})
import numpy as np, shards
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
anon, mapped = status("RssAnon"), status("RssFile")
cpu, wall = time.process_time(), time.perf_counter()
ds = shards.ShardDataset({folder!r})
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
rng = random.Random(0)
t = time.perf_counter()
for _ in range(20000):
    ds.row(rng.randrange(len(ds)))
lookup = (time.perf_counter() - t) / 20000
private = status("RssAnon") - anon
for index in ds.indexes:  # fault in every page of every index
    int(np.asarray(index)[:, 0].sum())
print(json.dumps(dict(n=len(ds), cpu=cpu, wall=wall, private=private, lookup=lookup,
                      mapped=status("RssFile") - mapped)))
"""


def probe_index(folder):
    """ShardDataset(folder) opened in a fresh process: its time, memory and row lookups."""
    code = INDEX_PROBE.format(repo=REPO, folder=folder)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_index(n_samples, per_shard=10_000, pairs=88_000_000, ranks=8):
    """Build and open the shard index on tiny samples, extrapolated to `pairs`."""
    n_shards = max(1, n_samples // per_shard)
    with tempfile.TemporaryDirectory() as folder:
        first = os.path.join(folder, "00000.tar")
        write_shard(first, [(f"{i:09d}", b"\xff\xd8 tiny", "a caption") for i in range(per_shard)])
        for k in range(1, n_shards):  # copies: the index does not care that the keys repeat
            shutil.copyfile(first, os.path.join(folder, f"{k:05d}.tar"))
        one = os.path.join(folder, "one")
        os.mkdir(one)
        built = probe_index(folder)  # first open: scans every shard
        for ext in ("", ".idx.npy"):
            os.link(first + ext, os.path.join(one, "00000.tar" + ext))
        cached, single = probe_index(folder), probe_index(one)
        import shards
        t = time.process_time()
        shards._scan_shard(first)
        ours = time.process_time() - t
        t = time.process_time()
        with tarfile.open(first) as tar:
            for _ in tar:
                pass
        theirs = time.process_time() - t
    n, shards_at_scale = built["n"], pairs / per_shard
    # private memory = fixed + per shard: from 1 shard and from n_shards
    per_shard_bytes = max(0.0, (cached["private"] - single["private"]) / max(1, n_shards - 1))
    scale = pairs / n
    print(f"\n## Shard index: {n:,} tiny samples in {n_shards} pax tars of {per_shard:,} "
          f"(jpg + txt + json, a pax header each, as img2dataset writes them), each open in a "
          f"fresh process; extrapolated to {pairs / 1e6:.0f}M pairs in {shards_at_scale:,.0f} "
          f"shards")
    print(f"| | measured | at {pairs / 1e6:.0f}M pairs |")
    print("|---|---|---|")
    print(f"| first open: scan the tar headers, write `.idx.npy` (CPU) | {built['cpu']:.2f} s "
          f"({built['cpu'] / n * 1e6:.1f} us a sample) | {built['cpu'] * scale / 3600:.2f} h on "
          f"one core, {built['cpu'] * scale / ranks / 60:.1f} min a rank with {ranks} ranks "
          f"(plus reading the headers from disk) |")
    print(f"| later opens, index cached (wall) | {cached['wall'] * 1e3:.0f} ms "
          f"({cached['wall'] / n_shards * 1e3:.2f} ms a shard) | "
          f"{cached['wall'] / n_shards * shards_at_scale:.0f} s |")
    print(f"| private memory a process (RssAnon) | {cached['private'] / 1024:.0f} KiB "
          f"({cached['private'] / n:.2f} B a sample; {per_shard_bytes:,.0f} B a shard) | "
          f"{(single['private'] + per_shard_bytes * shards_at_scale) / 2 ** 20:.0f} MiB a rank "
          f"(before: 41 B a sample = {41 * pairs / 2 ** 30:.1f} GiB a rank) |")
    print(f"| page cache, shared by every rank and worker (RssFile) | "
          f"{cached['mapped'] / n:.1f} B a sample | {cached['mapped'] / n * pairs / 2 ** 30:.1f} "
          f"GiB a node |")
    print(f"| random row lookup | {cached['lookup'] * 1e6:.1f} us | |")
    print(f"| one shard's headers: shards' scan / Python's tarfile (CPU) | {ours * 1e3:.0f} ms / "
          f"{theirs * 1e3:.0f} ms ({theirs / ours:.0f}x) | |")
