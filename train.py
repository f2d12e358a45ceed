"""Train CLIP or DeCLIP: one process, or many with torchrun (DDP + AMP), with exact resume.

DeCLIP (Li et al., ICLR 2022) Sec. 3 and Appendix C; the CLIP variants of the medium-scale study
(SigLIP loss, FLIP patch dropout, ToMe, pre-trained towers) and the Table 4 ablation are flags.

    python train.py                   # the demo: tiny DeCLIP on 2,000 built-in pairs, CPU, ~10 min
    python train.py --method clip     # CLIP with the same settings, for contrast
    torchrun --nproc_per_node=8 train.py --data cc3m          # the paper's CC3M setting (preset)
    torchrun --nproc_per_node=8 --max-restarts=3 train.py --data cc3m --resume auto

One training step (all ranks):  reseed RNGs from (seed, rank, step) -> forward under autocast ->
loss -> backward (DDP averages gradients) -> if the gradient is not finite, skip the step and undo
the BatchNorm statistics -> clip -> AdamW -> push the batch's text features to the NN queue ->
clamp the logit scale.  Everything random is a pure function of (seed, rank, step) or of
(seed, epoch, sample index), so a run resumed at step k ends bit-for-bit where an uninterrupted
run ends (on CPU), and the checkpoint needs no RNG state beyond the seed.

Left out on purpose: gradient accumulation, EMA weights, SGD for the text tower (Appendix C uses it
for ViT-B/32; AdamW for both towers is what the official code and OpenCLIP do).
"""
import argparse
import functools
import math
import os
import sys
import time
import warnings

# Set before torch loads OpenMP: compute threads that wait at the end of a parallel region sleep
# instead of spinning, so the data-loading worker gets the core they would burn (2 cores, batch
# 256: 1.2x the end-to-end step; `python experiments/bench.py --only cpu`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import eda
import eval_zeroshot
import views
from declip import MLM_PASSES, DeCLIP
from distributed import all_ranks_sum, assert_replicas_agree, setup_distributed
from factory import PRESETS as PRESETS_CLIP, create_model, load_tokenizer, tokenizer_state
from losses import clamp_logit_scale_
from optim import BadSteps, clip_gradients, lock_tower, lr_at, param_groups, train_mode
from runlog import RunLog
from tokenizer import Tokenizer

DEMO_STEPS = 300  # runs on other data without --steps, --epochs or a preset
# measured at the defaults on seed 0 (README.md): printed after the demo for contrast
DEMO_FOOTER = ("for contrast, CLIP: the same command with --method clip (at the defaults, seed 0: "
               "58.4% top-1, measured; DeCLIP 92.8%)")
# Settings of the papers, one flag each. Flags given on the command line override them.
PRESETS = {
    # `python train.py`: the built-in data in the regime where DeCLIP's claim shows (docs/results):
    # data-limited (2,000 unique pairs) at a batch where the paper's views learn form (256);
    # 150 epochs of 7 steps, under 10 minutes on 2 CPU cores (the slower seeds need that many
    # to pass 85%). `--method clip` is the contrast.
    "demo": dict(data="builtin", method="declip", train_size=2000, batch_size=256, epochs=150,
                 warmup=50, eval_every=150),
    # DeCLIP's CC3M ablation (Table 4): RN50, global batch 1024 (128 x 8 GPUs), 32 epochs; the
    # official code's optimiser: AdamW (0.9, 0.98), lr 1e-3, wd 0.1, 2,500 warm-up steps.
    "declip-cc3m": dict(model="RN50", data="cc3m", method="declip", batch_size=128, epochs=32,
                        lr=1e-3, wd=0.1, warmup=2500, queue_size=65536, zeroshot="imagenet"),
    "clip-cc3m": dict(model="RN50", data="cc3m", method="clip", batch_size=128, epochs=32,
                      lr=1e-3, wd=0.1, warmup=2500, zeroshot="imagenet"),
    # The medium-scale study: ViT-S/16, global batch 2048 (256 x 8), 24 epochs, 2,000 warm-up steps.
    "study-vits-cc3m": dict(model="ViT-S-16", data="cc3m", method="clip", batch_size=256, epochs=24,
                            lr=1e-3, wd=0.1, warmup=2000, queue_size=65536, zeroshot="imagenet"),
    # The study's best row (Fig. 2 with Fig. 3's SigLIP): DINO ViT-S/16 and XLM-RoBERTa, both in
    # Hugging Face format (facebook/dino-vits16, xlm-roberta-base downloaded to these folders).
    "study-dino-xlmr-siglip-cc3m": dict(
        model="ViT-S-16", data="cc3m", method="clip", loss="siglip", batch_size=256, epochs=24,
        lr=1e-3, wd=0.1, warmup=2000, zeroshot="imagenet",
        pretrained_image="hf-vit:data/dino-vits16", pretrained_text="xlmr:data/xlm-roberta-base"),
}


def get_args(argv=None):
    """The flags, grouped as --help shows them; a preset's values are defaults that flags
    given on the command line override."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a paper setting; flags override it (--data cc3m: declip-cc3m)")
    for add in (method_flags, model_flags, data_flags, optimisation_flags, run_flags):
        add(p)
    args = p.parse_args(argv)
    if args.preset is None and args.data in ("builtin", "cc3m"):
        # `train.py` is the demo, `train.py --data cc3m` the paper's run
        args.preset = "demo" if args.data == "builtin" else "declip-cc3m"
        argv = [*(sys.argv[1:] if argv is None else argv), "--preset", args.preset]
    if args.preset:  # preset values become defaults; flags given explicitly still win
        p.set_defaults(**PRESETS[args.preset])
        if "epochs" in PRESETS[args.preset]:
            p.set_defaults(steps=None)
        args = p.parse_args(argv)
    args.output = args.output or os.path.join("runs", args.preset or "demo")
    if args.method == "clip":
        args.mvs = args.ss = args.nns = False
    if args.steps is None and args.epochs is None:
        args.steps = DEMO_STEPS
    if args.data_seed is None:
        args.data_seed = args.seed
    if args.train_size is not None and (args.data != "builtin" or args.train_size < 0):
        p.error("--train-size N (N >= 1; 0: all) applies to --data builtin only")
    args.train_size = args.train_size or None  # 0: the whole generated set
    for flag in ("batch_size", "save_every", "log_every", "workers", "max_bad_steps"):
        if getattr(args, flag) < (0 if flag == "workers" else 1):
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if not 0.0 <= args.patch_dropout < 1.0:
        p.error("--patch-dropout must be in [0, 1)")
    return args


def method_flags(p):
    g = p.add_argument_group('what to train (DeCLIP Eq. 2, SigLIP)')
    g.add_argument("--method", choices=["clip", "declip"], default="declip")
    g.add_argument("--no-mvs", dest="mvs", action="store_false", help="DeCLIP without multi-view")
    g.add_argument("--no-ss", dest="ss", action="store_false", help="DeCLIP without SimSiam + MLM")
    g.add_argument("--no-nns", dest="nns", action="store_false", help="DeCLIP without the NN queue")
    g.add_argument("--loss", choices=["infonce", "siglip"], default="infonce")
    g.add_argument("--logit-scale-init", type=float, default=None,
                   help="initial multiplier t (default: 1/0.07 for infonce, 10 for siglip)")
    g.add_argument("--logit-bias-init", type=float, default=None,
                   help="siglip: initial bias b (default: -log(global batch); the SigLIP paper's "
                        "-10 is -log of its 32k batch)")
    g.add_argument("--mlm-pass", choices=list(MLM_PASSES), default="shared",
                   help="DeCLIP's MLM: on the contrastive pass over the masked caption (shared, "
                        "the official code), or a pass of its own (separate: causal; "
                        "bidirectional: BERT-style)")
    g.add_argument("--loss-weights", choices=["paper", "official"], default="paper",
                   help="Eq. 2's weights (paper), or the official code's: the multi-view pairs "
                        "folded into the CLIP term (docs/declip.md)")
    g.add_argument("--alpha", type=float, default=0.2, help="weight of L_ISS + L_TSS")
    g.add_argument("--beta", type=float, default=0.2, help="weight of L_MVS")
    g.add_argument("--gamma", type=float, default=0.2, help="weight of L_NNS")
    g.add_argument("--queue-size", type=int, default=None,
                   help="NN queue length (the paper: 65,536 at batch 1024+); default: the "
                        "samples of the run's last 10%% of steps, at most 65,536 and at most a "
                        "quarter of the training pairs")


def model_flags(p):
    g = p.add_argument_group('model (clip.py presets, FLIP, ToMe, pre-trained and locked towers)')
    g.add_argument("--model", default="tiny-rn", choices=list(PRESETS_CLIP))
    g.add_argument("--patch-dropout", type=float, default=0.0,
                   help="FLIP: fraction of patches dropped")
    g.add_argument("--image-size", type=int, default=None, help="default: the model preset's")
    g.add_argument("--tome-r", type=int, default=0, help="ToMe: tokens merged per ViT block")
    g.add_argument("--pretrained-image", default=None,
                   help="dino:FILE, hf-vit:DIR (Hugging Face ViTModel) or tv-resnet50:FILE")
    g.add_argument("--pretrained-text", default=None,
                   help="bert:DIR or xlmr:DIR (Hugging Face weights + their tokenizer files)")
    g.add_argument("--lock-image", action="store_true", help="LiT: freeze the image tower body")
    g.add_argument("--lock-text", action="store_true", help="freeze the text tower body")
    g.add_argument("--image-lr", type=float, default=None, help="image tower lr (default --lr)")
    g.add_argument("--text-lr", type=float, default=None, help="text tower lr (default --lr)")


def data_flags(p):
    g = p.add_argument_group('data')
    g.add_argument("--image-aug", choices=["clip", "declip"], default=None,
                   help="training views: CLIP's mild crop, or DeCLIP's Appendix B views (default: "
                        "declip when --method declip uses two views, else clip)")
    g.add_argument("--data", default="builtin",
                   help="builtin, a csv/tsv file, or a folder under --data-root")
    g.add_argument("--data-root", default="data")
    g.add_argument("--train-size", type=int, default=None,
                   help="builtin: unique training pairs (data-limited runs; 0: all 1,000,000)")
    g.add_argument("--data-seed", type=int, default=None,
                   help="builtin: which dataset is generated, train and eval (default: --seed)")
    g.add_argument("--csv-img-key", default="filepath")
    g.add_argument("--csv-caption-key", default="title")
    g.add_argument("--csv-separator", default=None, help="default: tab for .tsv, comma otherwise")
    g.add_argument("--tokenizer", default="auto",
                   help="openai, train (learn BPE on the training captions), or a merges file; "
                        "auto = train for builtin data, openai otherwise")
    g.add_argument("--vocab-size", type=int, default=768, help="for --tokenizer train")
    g.add_argument("--workers", type=int, default=min(8, (os.cpu_count() or 2) // 2),
                   help="data-loading processes per rank")


def optimisation_flags(p):
    g = p.add_argument_group('optimisation')
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--steps", type=int, default=None,
                   help=f"total steps (overrides --epochs; default {DEMO_STEPS} if neither)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--wd", type=float, default=0.1)
    g.add_argument("--beta2", type=float, default=0.98)
    g.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then cosine")
    g.add_argument("--grad-clip", type=float, default=None, help="max gradient norm")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward: less memory, ~1/3 "
                        "more compute (DeCLIP RN50 at 128 per GPU on 16 GB)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (GPU runs)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on GPUs and CPUs that compute in it natively (CPU: "
                        "AVX512-BF16 or AMX), else fp32; fp16 (GPU): with a GradScaler")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC images and weights (default: on for ResNet towers, where it is "
                        "faster on GPUs and CPUs; ViTs have no convolutions to gain from it)")
    g.add_argument("--max-bad-steps", type=int, default=20,
                   help="abort after this many consecutive non-finite steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda if available")


def run_flags(p):
    g = p.add_argument_group('run: output, resume, logs, evaluation')
    g.add_argument("--output", default=None, help="default: runs/<preset> or runs/demo")
    g.add_argument("--resume", default=None,
                   help="'auto' (the checkpoint in --output, if any) or a path")
    g.add_argument("--save-every", type=int, default=200)
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--eval-every", type=int, default=0,
                   help="zero-shot eval every N steps (0: at the end only)")
    g.add_argument("--eval-size", type=int, default=1000, help="built-in eval images")
    g.add_argument("--zeroshot", default="builtin", choices=["builtin", "imagenet", "cifar10",
                   "cifar100"], help="zero-shot eval set (eval_zeroshot.py has more)")
    g.add_argument("--zeroshot-root", default="data/imagenet", help="its folder, if not builtin")


# ----------------------------------------------------------------------------- device

def choose_precision(args, device):
    """--precision, or the device's default; fp16 needs a GPU (its GradScaler is CUDA's)."""
    args.device = str(device)
    args.precision = args.precision or default_precision(device)
    if args.precision == "fp16" and device.type != "cuda":
        raise SystemExit("--precision fp16 needs a CUDA GPU: use bf16 or fp32 on CPU")


def default_precision(device):
    """bf16 where the hardware multiplies in it: CUDA GPUs that support it (Ampere on), and CPUs
    with AVX512-BF16 or AMX (2.2x the fp32 step on a 2-core AVX512-BF16 machine; other CPUs
    emulate bf16, slower than fp32). fp32 elsewhere."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported",
                                                      "_is_amx_tile_supported")]
    return "bf16" if device.type == "cpu" and any(f() for f in native if f) else "fp32"


def seed_step(seed, rank, step):
    """All randomness of a step (patch dropout, MLM masking) comes from (seed, rank, step)."""
    torch.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


# ----------------------------------------------------------------------------- data

def build_base(args):
    """The training pairs of --data (--train-size, --data-seed: which built-in pairs)."""
    try:
        return data.build_dataset(args.data, args.data_root, split="train",
                                  image_size=args.image_size or
                                  PRESETS_CLIP[args.model]["image_resolution"],
                                  seed=args.data_seed, size=args.train_size,
                                  img_key=args.csv_img_key,
                                  caption_key=args.csv_caption_key, sep=args.csv_separator)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


def default_queue_size(total_steps, global_batch, n_train=None):
    """The NN queue holds the text features of the run's last ~10% of steps, at most 65,536, and
    at most a quarter of the n_train training pairs.

    The paper's 65,536 (64 steps of its 1024 batch) holds features a few hundred steps old at
    most; in a 1,000-step demo the same length would hold the whole run, and its entries would
    mostly come from a model that no longer exists. The paper's queue also holds 0.4% of an epoch
    of its 15M pairs, so a caption never meets its own earlier feature there; in a many-epoch run
    of a small set (--train-size) a queue longer than an epoch would hold every caption, and its
    "nearest neighbour" would be itself. With a quarter of an epoch, a caption's previous
    occurrence is still in the queue in 1/32 of steps (two epochs' shuffles, gap < N/4).
    """
    size = min(65536, max(1, total_steps // 10) * global_batch)
    return size if n_train is None else max(1, min(size, n_train // 4))


def build_tokenizer(args, base, checkpoint):
    """Returns (tokenizer, merges to store in checkpoints: None stands for OpenAI's vocabulary)."""
    if args.pretrained_text:  # BERT, XLM-R bring their own tokenizers (stored as "tokenizer")
        try:
            return load_tokenizer(args.pretrained_text), None
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--pretrained-text: {e}") from None
    if checkpoint is not None:  # resume: the vocabulary travels with the weights
        merges = checkpoint.get("merges")
        if merges is None:
            return Tokenizer.openai(), None
        return Tokenizer([tuple(m.split(" ")) for m in merges]), merges
    kind = args.tokenizer
    if kind == "auto":
        kind = "train" if args.data == "builtin" else "openai"
    if kind == "openai":
        return Tokenizer.openai(), None
    if kind == "train":  # deterministic, so every rank learns the same merges without talking
        texts = [base.caption(i) for i in range(min(len(base), 20000))]
        tokenizer = Tokenizer.train(texts, args.vocab_size)
    elif os.path.exists(kind):
        tokenizer = Tokenizer.from_merges(kind)
    else:
        raise SystemExit(f"--tokenizer {kind}: no such merges file (use openai, train, or a path)")
    return tokenizer, [" ".join(m) for m in tokenizer.merges]


def build_loader(args, base, tokenizer, image_size, rank, world, total_steps, start_step=0):
    two_views = args.mvs or args.ss
    if (args.image_aug or ("declip" if two_views else "clip")) == "declip":
        transform = views.DeclipView(image_size)  # Appendix B (ablations: data_ablation.py)
    else:
        transform = views.clip_image_transform(image_size)
    dataset = data.ImageText(base, transform, views=2 if two_views else 1,
                             text_aug=eda.augment if args.mvs else None, seed=args.seed)
    sampler = data.StepSampler(len(dataset), args.batch_size, rank, world, args.seed, total_steps,
                               start_step)
    collate = functools.partial(data.collate, tokenizer=tokenizer,
                                context_length=args.context_length)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        collate_fn=collate, drop_last=True, pin_memory=torch.cuda.is_available())
    return dataset, sampler, loader


# ----------------------------------------------------------------------------- the model

def build_declip(args, tokenizer, n_train, world, device, checkpoint):
    """The CLIP of --model (and --pretrained-*), inside DeCLIP's heads and losses (a plain CLIP
    run is DeCLIP with every head off), on device, resumed if a checkpoint is given."""
    overrides = dict(vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
                     patch_dropout=args.patch_dropout, tome_r=args.tome_r)
    if args.image_size:
        overrides["image_resolution"] = args.image_size
    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    try:
        clip = create_model(args.model, image=args.pretrained_image, text=args.pretrained_text,
                            **overrides)
        if args.grad_checkpointing:  # recompute each block's activations in backward
            clip.set_grad_checkpointing(True)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--model/--pretrained-*/--grad-checkpointing: {e}") from None
    if checkpoint is not None and checkpoint["model_config"] != clip.config:
        raise SystemExit(f"--resume: the checkpoint holds another architecture "
                         f"({checkpoint['args'].get('model')}); use the same --model and flags")
    args.context_length = clip.context_length  # the captions' token length (build_loader)
    if args.queue_size is None:
        args.queue_size = default_queue_size(args.total_steps, args.batch_size * world, n_train)
    if args.loss == "siglip" and args.logit_bias_init is None:
        args.logit_bias_init = -math.log(args.batch_size * world)  # prior: 1 positive in N
    model = DeCLIP(clip, alpha=args.alpha, beta=args.beta, gamma=args.gamma, mvs=args.mvs,
                   ss=args.ss, nns=args.nns, loss=args.loss, queue_size=args.queue_size,
                   mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                   sot_id=tokenizer.sot_id, eot_id=tokenizer.eot_id, mlm_pass=args.mlm_pass,
                   weights=args.loss_weights,
                   logit_scale_init=args.logit_scale_init,
                   logit_bias_init=args.logit_bias_init).to(device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    for side in ("image", "text"):
        if getattr(args, f"lock_{side}"):
            lock_tower(model, side)
    return model


def wrap_model(model, args, device, world):
    """SyncBatchNorm across GPUs, channels-last, DDP, torch.compile. Returns (the model to call,
    the memory format of its images); `model` stays the unwrapped module (checkpoints, eval)."""
    if world > 1 and device.type == "cuda":  # a ResNet tower's BatchNorm sees the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # ResNet towers: channels-last (NHWC) is the layout tensor cores, and oneDNN on CPUs, convolve
    # without transposes (CPU, tiny-rn: 1.3x the step in fp32, 1.5x in bf16; docs/speed.md); the
    # images are moved to the device in the same layout.
    if args.channels_last is None:
        args.channels_last = not hasattr(model.clip.visual, "transformer")
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    model = model.to(memory_format=memory_format)
    if dist.is_initialized():  # torchrun, even with one process (the GPU check's smoke run)
        # broadcast_buffers=False: the NN queue is identical on every rank by construction (it is
        # fed the gathered batch) and SimSiam's BatchNorm is synchronised, so there is nothing
        # to broadcast, and broadcasting a 64K x D queue every step would cost real time.
        with warnings.catch_warnings():  # torch >= 2.14 renames the flag; 2.2 only knows this name
            warnings.simplefilter("ignore", FutureWarning)
            model = DistributedDataParallel(model, broadcast_buffers=False, device_ids=[
                device.index] if device.type == "cuda" else None)
    if args.compile:  # off by default: minutes of compilation pay off only in long runs
        model = torch.compile(model)
    return model, memory_format


def build_optimizer(model, args, device, checkpoint):
    """AdamW over optim.param_groups (no decay on norms, biases, logit scale/bias; a peak lr per
    tower), the fp16 GradScaler (a no-op otherwise) and the autocast context."""
    groups = param_groups(model, args.lr, args.wd, args.image_lr, args.text_lr)
    # one fused kernel for the whole update on CUDA; multi-tensor (foreach) ops elsewhere
    fused = (dict(fused=True, foreach=None) if device.type == "cuda"
             else dict(fused=None, foreach=True))
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=1e-6, **fused)
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group in optimizer.param_groups:  # not the kernel choice of the machine it came from
            group.update(fused)
        scaler.load_state_dict(checkpoint["scaler"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16"
                              else torch.float16, enabled=args.precision != "fp32")
    return optimizer, scaler, autocast


# ----------------------------------------------------------------------------- one step

def train_step(model, ddp, batch, optimizer, scaler, autocast, bad, step, args):
    """One step of Eq. 2 on the global batch (DDP averages the gradients): lr, forward, backward,
    clip, AdamW, push the queue, clamp the logit scale. Returns the loss terms, as tensors: the
    finite check is the step's one host sync."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args.total_steps, args.warmup, group["base_lr"])
    bad.snapshot()
    with autocast:
        loss, terms = ddp(batch["image"], batch.get("image_aug"), batch["ids"],
                          batch.get("ids_aug"), push=False)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    # DDP made the gradients identical on every rank, so every rank takes the same decision.
    finite = bool(torch.isfinite(clip_gradients(model.parameters(), args.grad_clip)))
    if finite:
        scaler.step(optimizer)
        model.push_queue()  # the NN queue only ever holds features of good steps
    bad.record(finite, step)
    scaler.update()
    clamp_logit_scale_(model.clip.logit_scale)
    return {k: v.detach().float() for k, v in terms.items()}


def to_device(batch, device, memory_format):
    """The batch on the device, images in the model's memory format; n_skipped stays behind."""
    return {k: v.to(device, non_blocking=True,
                    memory_format=memory_format if v.dim() == 4 else torch.preserve_format)
            for k, v in batch.items() if k != "n_skipped"}


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_state(model, optimizer, scaler, merges, tokenizer, args, step):
    """What --resume needs (weights, queue, optimizer, step), and what factory.load_checkpoint
    reads to rebuild the CLIP alone (state_dict, model_config, the tokenizer)."""
    return {"state_dict": model.clip.state_dict(), "model_config": model.clip.config,
            "merges": merges, "tokenizer": args.pretrained_text and tokenizer_state(
                args.pretrained_text, tokenizer),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step,
            "epoch": step // args.steps_per_epoch, "batch_in_epoch": step % args.steps_per_epoch,
            "args": vars(args)}


def save_checkpoint(path, state, rank=0, world=1):
    """Rank 0 writes `state` to a temporary file, then renames it: a kill mid-write never leaves a
    broken checkpoint. The other ranks (state None) wait for it."""
    if rank == 0:
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
    if world > 1:
        dist.barrier()


def load_resume(args):
    if args.resume is None:
        path = os.path.join(args.output, "checkpoint.pt")
        if os.path.exists(path):
            raise SystemExit(f"{path} exists: pass --resume auto to continue that run, "
                             f"or --output DIR for a new one")
        return None
    path = os.path.join(args.output, "checkpoint.pt") if args.resume == "auto" else args.resume
    if not os.path.exists(path):
        if args.resume == "auto":
            return None  # first start of a run launched with --resume auto (torchrun restarts)
        raise SystemExit(f"--resume {path}: no such file")
    try:  # our checkpoints hold tensors and plain Python types only: no code runs on load
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise SystemExit(f"--resume {path}: unreadable checkpoint ({type(e).__name__}: {why}); "
                         f"delete it or resume from another file") from None


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    """Set up, build, train (a loop of train_step with logs, evaluations and checkpoints),
    evaluate. Returns the final zero-shot result (rank 0; {} on the other ranks)."""
    args = get_args(argv)
    rank, world, device = setup_distributed(args.device)
    choose_precision(args, device)
    checkpoint = load_resume(args)
    base = build_base(args)
    tokenizer, merges = build_tokenizer(args, base, checkpoint)
    args.steps_per_epoch = len(base) // (args.batch_size * world)
    args.total_steps = args.steps if args.steps is not None else args.epochs * args.steps_per_epoch
    model = build_declip(args, tokenizer, len(base), world, device, checkpoint)
    ddp, memory_format = wrap_model(model, args, device, world)
    optimizer, scaler, autocast = build_optimizer(model, args, device, checkpoint)
    step = 0 if checkpoint is None else checkpoint["step"]
    image_size = model.clip.visual.input_resolution
    _, _, loader = build_loader(args, base, tokenizer, image_size, rank, world, args.total_steps,
                                step)
    zeroshot = zeroshot_set(args, image_size) if rank == 0 else None
    log = RunLog(args, model, base, world, step) if rank == 0 else None
    state = functools.partial(checkpoint_state, model, optimizer, scaler, merges, tokenizer, args)

    bad, terms, n_skipped = BadSteps(model, args.max_bad_steps), [], 0
    train_mode(model)  # model.train(), but locked BatchNorms stay frozen
    t_start = time.perf_counter()
    for batch in loader:
        seed_step(args.seed, rank, step)
        n_skipped += batch["n_skipped"]  # unreadable samples, replaced by data.ImageText
        batch = to_device(batch, device, memory_format)
        terms.append(train_step(model, ddp, batch, optimizer, scaler, autocast, bad, step, args))
        step += 1
        if step % args.log_every == 0 or step == args.total_steps:
            skipped = all_ranks_sum(n_skipped, world, device)
            if log:
                log.steps(step, len(terms), terms, bad.total, skipped)
            terms = []
        if log:
            log.tick()
        if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
            evaluate(model.clip, tokenizer, args, device, rank, world, step, log, zeroshot)
            train_mode(model)
        if step % args.save_every == 0 or step == args.total_steps:
            save_checkpoint(os.path.join(args.output, "checkpoint.pt"),
                            state(step) if rank == 0 else None, rank, world)
    train_seconds = time.perf_counter() - t_start
    if world > 1:
        assert_replicas_agree(model)
    result = evaluate(model.clip, tokenizer, args, device, rank, world, step, log, zeroshot)
    if log:
        log.finish(result, step, train_seconds, footer=DEMO_FOOTER if args.preset == "demo"
                   and args.method == "declip" else None)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def zeroshot_set(args, image_size):
    """(loader, class names, templates) of --zeroshot, read at start so a bad path fails early."""
    if args.zeroshot == "builtin":
        return None
    from torchvision import transforms
    try:
        transform = transforms.Compose([eval_zeroshot.to_rgb, views.eval_transform(image_size)])
        ds, classnames, key = eval_zeroshot.zero_shot_dataset(args.zeroshot, args.zeroshot_root,
                                                              transform)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"--zeroshot {args.zeroshot} --zeroshot-root {args.zeroshot_root}: "
                         f"{e} (or pass --zeroshot builtin)") from None
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=args.workers)
    return loader, classnames, eval_zeroshot.read_list(key, "templates")


def evaluate(clip, tokenizer, args, device, rank, world, step, log, zeroshot=None):
    """Zero-shot top-1/top-5 (built-in eval split or --zeroshot), on rank 0; the others wait."""
    result = {}
    if rank == 0 and zeroshot is not None:
        result = eval_zeroshot.zero_shot_eval(clip, tokenizer, *zeroshot, device=device)
    elif rank == 0:
        result = eval_zeroshot.evaluate_builtin(clip, tokenizer, n=args.eval_size, device=device,
                                                seed=args.data_seed)
    if log is not None:
        log.write({"step": step, "zeroshot": result})
    if world > 1:
        dist.barrier()
    return result


if __name__ == "__main__":
    main()
