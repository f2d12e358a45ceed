"""Zero-shot image classification with a CLIP / DeCLIP model (DeCLIP Sec. 4.2 and Appendix E).

Each class name c is put into every prompt template t ("a photo of a {c}."); the T prompts go
through the text tower, are L2-normalised, averaged and L2-normalised again ("prompt ensembling",
CLIP Sec. 3.1.4).
These C class embeddings are the columns of a linear classifier W; an image is assigned the class of
largest cosine similarity, with CLIP's fixed logit scale of 100 (only the ranking matters here):

    W = normalize(mean_t normalize(encode_text(t.format(c=c))))       # (D, C)
    logits = 100 * normalize(encode_image(x)) @ W                      # (B, C)

Datasets: ImageNet-1k validation in folder layout (`val/<wnid>/*.JPEG`; sorted wnids give CLIP's
1000 names and its 80 templates), CIFAR-10/100 through torchvision (CLIP's 18 templates), any
ImageFolder (folder names are the class names), and the built-in synthetic eval split of data.py.
Class names and templates live in assets/zeroshot_*.json (see assets/LICENSE-zeroshot-metadata.txt).

Shapes: B images, C classes, T templates, D embedding, L context length.

Usage:
    python eval_zeroshot.py --checkpoint out/last.pt --dataset builtin
    python eval_zeroshot.py --checkpoint ViT-B-32.pt --dataset imagenet --data-root data/imagenet
    python eval_zeroshot.py --checkpoint out/last.pt --dataset cifar10 --data-root data/cifar \
        --json results/zeroshot_cifar10.json

    from eval_zeroshot import evaluate_builtin
    from factory import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("out/last.pt")  # any checkpoint format
    metrics = evaluate_builtin(model, tokenizer, n=1000)  # {"top1": 0.41, "top5": 0.83, "n": 1000}

Deliberately left out: other zero-shot benchmarks (VTAB; retrieval is in retrieval.py), multi-GPU
evaluation, mixed precision (fp32 is fast enough for evaluation), and CLIP's per-dataset
hand-tuned class names beyond the lists shipped in assets/. Accuracies are fractions in [0, 1];
the CLI prints percentages.
"""
import argparse
import json
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
LOGIT_SCALE = 100.0  # CLIP's zero-shot logits use a fixed 100 x cosine, not the learned temperature

DOWNLOAD_HINT = ("python -c \"import torchvision; "
                 "torchvision.datasets.{name}('{root}', download=True)\"")


# ----------------------------------------------------------------------------- metadata and helpers

def load_metadata(kind):
    """assets/zeroshot_{kind}.json for kind in ("classnames", "templates"): {dataset key: [str]}."""
    with open(os.path.join(ASSETS, f"zeroshot_{kind}.json"), encoding="utf-8") as f:
        return json.load(f)


def read_list(spec, kind):
    """Class names / templates from a key of the shipped assets, a JSON list or a text file.

    Text files hold one entry per line (blank lines skipped), so names may contain commas.
    """
    table = load_metadata(kind)
    if spec in table:
        return table[spec]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--{kind} {spec}: neither a file nor one of the keys of "
                                f"assets/zeroshot_{kind}.json ({', '.join(sorted(table))})")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    if spec.endswith(".json"):
        items = json.loads(text)
        if not (isinstance(items, list) and all(isinstance(s, str) for s in items)):
            raise ValueError(f"--{kind} {spec}: expected a JSON list of strings")
        return items
    return [line.strip() for line in text.splitlines() if line.strip()]


@contextmanager
def eval_mode(model):
    """model.eval() inside the block, then the previous mode (train.py evaluates mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def context_length_of(model):
    config = getattr(model, "config", None) or {}
    if "context_length" in config:
        return config["context_length"]
    if hasattr(model, "context_length"):  # a CLIP whose text tower is a module (BERT, XLM-R)
        return model.context_length
    return model.positional_embedding.shape[0]


def image_size_of(model):
    config = getattr(model, "config", None) or {}
    if "image_resolution" in config:
        return config["image_resolution"]
    return model.visual.input_resolution


def model_dtype(model):
    """Images are cast to the dtype of the weights (an fp16 checkpoint stays fp16)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def to_rgb(image):
    # module level (not a lambda) so that DataLoader workers can pickle the transform
    return image.convert("RGB")


class LabeledImages(Dataset):
    """An (image, caption) dataset with label(i), e.g. data.SyntheticCaptions -> (image, label)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, _ = self.base[i]
        return self.transform(image), self.base.label(i)


# ------------------------------------------------------------------------- classifier and metrics

@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, templates, device="cpu", context_length=None,
                         batch_size=256):
    """Prompt-ensembled class embeddings W (D, C), columns L2-normalised.

    All C·T prompts are embedded in batches of `batch_size` (not one model call per class); the
    normalised text embeddings are summed per class as they come, so memory stays O(C·D).
    """
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    context_length = context_length or context_length_of(model)
    n_vocab = getattr(getattr(model, "token_embedding", None), "num_embeddings", None)
    # prompts never hold the MASK token (our last id), so OpenAI's 49408-row embedding is enough
    largest = max(getattr(tokenizer, "eot_id", 0), getattr(tokenizer, "sot_id", 0))
    if n_vocab is not None and largest >= n_vocab:
        raise ValueError(f"the tokenizer's ids reach {largest} but the model has only {n_vocab} "
                         f"tokens: use the tokenizer the checkpoint was trained with")
    T = len(templates)
    texts = [t.format(c=c) for c in classnames for t in templates]  # C·T prompts, class-major
    class_of = torch.arange(len(classnames), device=device).repeat_interleave(T)  # (C·T,)
    w = None
    with eval_mode(model):
        for i in range(0, len(texts), batch_size):
            ids = tokenizer(texts[i:i + batch_size], context_length=context_length)  # (b, L)
            ids = ids.to(device)
            z_txt = F.normalize(model.encode_text(ids).float(), dim=-1)  # (b, D)
            if w is None:
                w = torch.zeros(len(classnames), z_txt.shape[1], device=device)  # (C, D)
            w.index_add_(0, class_of[i:i + batch_size], z_txt)
    w = F.normalize(w / T, dim=-1)  # mean over templates, then back onto the unit sphere
    return w.T.contiguous()  # (D, C)


def mean_per_class_accuracy(pred, labels, num_classes):
    """Mean over classes (present in `labels`) of the per-class accuracy: Table 6's metric for
    Pets, Flowers, Caltech-101 and Aircraft, where plain accuracy would favour the large classes."""
    pred, labels = torch.as_tensor(pred).cpu(), torch.as_tensor(labels).cpu()
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).float()  # (C,)
    total = torch.bincount(labels, minlength=num_classes).float()  # (C,)
    present = total > 0
    return (correct[present] / total[present]).mean().item()


@torch.no_grad()
def zero_shot_eval(model, tokenizer, loader, classnames, templates, device="cpu",
                   mean_per_class=False, classifier=None, progress=False, return_preds=False):
    """Top-1 / top-5 accuracy (fractions) of the zero-shot classifier on (images, labels) batches.

    Returns {"top1", "top5", "n"} plus "mean_per_class" when asked. Pass `classifier` (D, C) to
    reuse one built earlier. top5 is top-min(5, C). return_preds adds the top-1 predictions and
    the labels, (n,) each.
    """
    if classifier is None:
        classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device)
    w = classifier.to(device).float()  # (D, C)
    k = min(5, w.shape[1])
    dtype = model_dtype(model)
    hits1 = hits5 = n = 0
    preds, targets = [], []
    with eval_mode(model):
        for images, labels in tqdm(loader, desc="zero-shot", disable=not progress):
            labels = torch.as_tensor(labels)
            z_img = model.encode_image(images.to(device, dtype)).float()  # (B, D)
            z_img = F.normalize(z_img, dim=-1)
            logits = LOGIT_SCALE * z_img @ w  # (B, C)
            topk = logits.topk(k, dim=-1).indices.cpu()  # (B, k)
            hit = topk == labels[:, None]  # (B, k)
            hits1 += hit[:, 0].sum().item()
            hits5 += hit.any(dim=1).sum().item()
            n += len(labels)
            preds.append(topk[:, 0])
            targets.append(labels)
    if n == 0:
        raise ValueError("zero_shot_eval: the loader yielded no images")
    result = {"top1": hits1 / n, "top5": hits5 / n, "n": n}
    if return_preds:
        result["preds"], result["labels"] = torch.cat(preds), torch.cat(targets)  # (n,), (n,)
    if mean_per_class:
        result["mean_per_class"] = mean_per_class_accuracy(torch.cat(preds), torch.cat(targets),
                                                           w.shape[1])
    return result


def evaluate_builtin(model, tokenizer, n=1000, image_size=None, batch_size=100, device="cpu",
                     seed=0, workers=0, progress=False):
    """Zero-shot top-1/top-5 on the built-in eval split (builtin_data.py), and its two factors.

    The class is colour x shape, so "colour" and "shape" are the fractions of images whose top-1
    class has the right colour (chance 1/7) and the right shape (chance 1/6): a model that learns
    colour only shows up as colour ~100%, shape ~17%.
    """
    from data import SyntheticCaptions  # lazy: this file imports without data.py
    from views import eval_transform  # lazy: this file imports without views.py

    image_size = image_size or image_size_of(model)
    base = SyntheticCaptions(split="eval", size=n, image_size=image_size, seed=seed)
    loader = DataLoader(LabeledImages(base, eval_transform(image_size)), batch_size=batch_size,
                        num_workers=workers)
    result = zero_shot_eval(model, tokenizer, loader, base.classnames, base.templates, device,
                            progress=progress, return_preds=True)
    result.update(colour_shape_accuracy(result.pop("preds"), result.pop("labels"),
                                        base.n_shapes))
    return result


def colour_shape_accuracy(pred, label, n_shapes):
    """Built-in classes are colour * n_shapes + shape: the accuracy of each factor of top-1."""
    return {"colour": (pred // n_shapes == label // n_shapes).float().mean().item(),
            "shape": (pred % n_shapes == label % n_shapes).float().mean().item()}


def save_json(result, path):
    """Write a result dict to `path` (its folder is created): the CLIs' --json."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def format_result(result):
    """'top-1 91.2%  top-5 99.0%  (colour 98.0%, shape 93.0%)' from a zero-shot result dict."""
    text = f"top-1 {100 * result['top1']:.1f}%  top-5 {100 * result['top5']:.1f}%"
    if "colour" in result:
        text += f"  (colour {100 * result['colour']:.1f}%, shape {100 * result['shape']:.1f}%)"
    return text


# ------------------------------------------------------------------------------------ datasets

def torchvision_dataset(name, root, hint=None, **kwargs):
    """torchvision.datasets.<name>(root, download=False, **kwargs), or a one-line FileNotFoundError
    that names the root and how to get the data (`hint`, default: torchvision's download=True)."""
    import torchvision

    hint = hint or DOWNLOAD_HINT
    how = hint.format(name=name, root=root)
    if root is None:
        raise FileNotFoundError(f"{name}: --data-root is required; get the data with: {how}")
    try:
        return getattr(torchvision.datasets, name)(root, download=False, **kwargs)
    except (RuntimeError, OSError) as e:  # torchvision: RuntimeError("Dataset not found ...")
        raise FileNotFoundError(f"{name} not found under {root} ({str(e).splitlines()[0]}); "
                                f"get it with: {how}") from None


def image_folder(root, transform=None, what="--data-root"):
    """torchvision ImageFolder (classes = sorted sub-folder names) with a one-line error."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what} {root}: no such folder (expected <root>/<class>/<image>)")
    try:
        return ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"{what} {root}: {str(e).splitlines()[0]}") from None


def imagenet_split(root, split="val", transform=None):
    """ImageNet-1k `split` in folder layout, given the ImageNet root or the split folder itself."""
    folder = os.path.join(root, split) if os.path.isdir(os.path.join(root or "", split)) else root
    if folder is None or not os.path.isdir(folder):
        raise FileNotFoundError(f"--data-root {root}: ImageNet not found; expected {root}/{split}/"
                                f"<wnid>/*.JPEG (the {split} images sorted into 1000 wnid folders)")
    ds = image_folder(folder, transform)
    if len(ds.classes) != 1000:
        raise ValueError(f"--data-root {folder}: found {len(ds.classes)} class folders, "
                         f"ImageNet-1k has 1000 (sort the images into wnid folders first)")
    return ds


def zero_shot_dataset(name, root, transform, classnames=None):
    """(dataset of (image, label), class names, default template key) for the CLI's --dataset."""
    table = load_metadata("classnames")
    if name == "imagenet":
        ds, key = imagenet_split(root, "val", transform), "imagenet1k"
    elif name in ("cifar10", "cifar100"):
        ds, key = torchvision_dataset(name.upper(), root, train=False, transform=transform), name
    elif name == "folder":
        ds = image_folder(root, transform)
        names = [c.replace("_", " ") for c in ds.classes]
        if classnames is None:
            return ds, names, "imagenet1k"
        key = classnames  # a key of the assets (e.g. "pets") also picks that dataset's templates
    else:
        raise ValueError(f"--dataset {name}: choose builtin, imagenet, cifar10, cifar100 or folder")
    names = read_list(classnames, "classnames") if classnames else table[key]
    n_classes = len(ds.classes)
    if len(names) != n_classes:
        raise ValueError(f"--classnames: {len(names)} names for the {n_classes} classes of {root}")
    return ds, names, key if key in load_metadata("templates") else "imagenet1k"


# ------------------------------------------------------------------------------------ command line

def main(argv=None):
    p = argparse.ArgumentParser(description="Zero-shot accuracy of a CLIP/DeCLIP model.")
    p.add_argument("--checkpoint", required=True, help="ours, OpenAI (JIT/state dict) or OpenCLIP")
    p.add_argument("--dataset", default="builtin",
                   choices=["builtin", "imagenet", "cifar10", "cifar100", "folder"])
    p.add_argument("--data-root", default=None, help="dataset root (not needed for builtin)")
    p.add_argument("--classnames", default=None,
                   help="key of assets/zeroshot_classnames.json, JSON list or text file")
    p.add_argument("--templates", default=None,
                   help="with {c}: key of assets/zeroshot_templates.json, JSON list or text file")
    p.add_argument("--n", type=int, default=1000, help="builtin: number of eval images")
    p.add_argument("--data-seed", type=int, default=0, help="builtin: which built-in dataset")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mean-per-class", action="store_true",
                   help="also report mean per-class accuracy")
    p.add_argument("--json", default=None, help="write the result dict to this file")
    args = p.parse_args(argv)

    if args.dataset != "builtin" and (args.data_root is None or not os.path.isdir(args.data_root)):
        hint = {"imagenet": "it must hold val/<wnid>/*.JPEG (ImageNet's validation images "
                            "sorted into their 1000 wnid folders)",
                "folder": "it must hold one sub-folder of images per class"}.get(args.dataset)
        if hint is None:  # CIFAR: torchvision downloads it
            hint = "get it with: " + DOWNLOAD_HINT.format(name=args.dataset.upper(),
                                                          root=args.data_root or "data/cifar")
        raise SystemExit(f"eval_zeroshot.py: --data-root {args.data_root} is not a folder; {hint}")
    try:
        if args.dataset != "builtin":  # read the dataset first: fail before loading the model
            ds, classnames, template_key = zero_shot_dataset(args.dataset, args.data_root, None,
                                                             args.classnames)
            templates = read_list(args.templates or template_key, "templates")
        from factory import load_model_and_tokenizer  # lazy: evaluating a model needs no loader

        model, tokenizer = load_model_and_tokenizer(args.checkpoint, args.device)
        if args.dataset == "builtin":
            result = evaluate_builtin(model, tokenizer, n=args.n, batch_size=args.batch_size,
                                      device=args.device, seed=args.data_seed,
                                      workers=args.workers, progress=True)
            if args.mean_per_class:
                print("note: --mean-per-class is ignored for builtin (its classes are balanced)")
        else:
            from views import eval_transform  # lazy: this file imports without views.py
            from torchvision import transforms

            # torchvision datasets apply .transform at __getitem__, so it can be set now
            ds.transform = transforms.Compose([to_rgb, eval_transform(image_size_of(model))])
            loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                pin_memory=args.device.startswith("cuda"))
            result = zero_shot_eval(model, tokenizer, loader, classnames, templates, args.device,
                                    mean_per_class=args.mean_per_class, progress=True)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval_zeroshot.py: {e}")

    result.update(dataset=args.dataset, checkpoint=args.checkpoint)
    extra = (f"  mean-per-class {100 * result['mean_per_class']:.2f}%"
             if "mean_per_class" in result else "")
    print(f"{args.dataset}: {format_result(result)}{extra}  (n={result['n']}, {args.checkpoint})")
    if args.json:
        save_json(result, args.json)


if __name__ == "__main__":
    main()
