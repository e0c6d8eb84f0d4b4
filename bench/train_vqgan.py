"""VQGAN training throughput: images/s of one full GAN step of train_vqgan.py (generator update with
pixel + codebook + adaptive-weighted GAN loss, then the PatchGAN discriminator update), per preset.

    python bench/train_vqgan.py                 # shapes (batch 16) and f16-16384 (batch 2 on CPU, 8 on GPU)

The step is train_vqgan.py's loop body with the GAN active (step past --disc-start), its preset defaults
(train_vqgan.parse_args), Adam betas (0.5, 0.9), grad clip, autocast from
engine.distributed.autocast_dtype('auto') (bf16 on CUDA and on CPUs with AMX). The
perceptual (LPIPS) loss is OFF (weight 0) in every row: it needs torchvision's VGG16 weights, which are not
available on the machines this was written on; f16-16384 trains with weight 1.0, so its real step is
slower than reported by one VGG16 forward/backward. Images: Shapes renders at the preset's resolution.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from bench import common as C  # noqa: E402
from engine import distributed as D  # noqa: E402


def sizes(quick: bool, device: torch.device) -> dict:
    if quick:
        return {"shapes": dict(batch=2, steps=1, warmup=1)}
    return {"shapes": dict(batch=16, steps=5, warmup=2),
            "f16-16384": dict(batch=8 if device.type == "cuda" else 2, steps=3, warmup=1),
            # Encoding only (pre-encoding, train_gpt's on-the-fly path): 8 images, no gradients.
            "f16-16384-encode": dict(batch=8, steps=3, warmup=1, encode=True),
            # Opt-in (--cases shapes-compile): channels-last eager vs torch.compile'd (train_vqgan --compile).
            "shapes-compile": dict(batch=16, steps=5, warmup=1, compile=True)}


OPT_IN = {"shapes-compile"}  # minutes of compiling on a CPU: run only when named


def run_case(name: str, quick: bool, device: torch.device) -> list[dict]:
    import train_vqgan as TV
    from datasets.shapes import ShapesDataset
    from models.discriminator import PatchDiscriminator
    from models.losses import VQLoss
    from models.vqgan import VQGAN

    spec = sizes(quick, device)[name]
    args = TV.parse_args(["--preset", name.removesuffix("-compile").removesuffix("-encode"), "--perceptual-weight", "0",
                          "--batch-size", str(spec["batch"])])
    cfg = TV.model_config(args)
    amp = D.autocast_dtype("auto", device)
    autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
    ds = ShapesDataset("unlabeled-train", length=1000, resolution=cfg.resolution)
    B, gan_step = spec["batch"], args.disc_start
    if spec.get("compile"):
        variants = [(torch.channels_last, False), (torch.channels_last, True)]
    else:  # train_vqgan.py's default (--channels-last) first, then the contiguous layout it replaces
        variants = [(torch.channels_last, False), (torch.contiguous_format, False)]

    def make_encode(nhwc, compiled: bool):
        torch.manual_seed(0)
        model = VQGAN(cfg).to(device).eval().requires_grad_(False).channels_last(nhwc == torch.channels_last)
        x = default_collate([ds[i] for i in range(B)])["image"].to(device)

        def step():
            with torch.no_grad(), autocast:
                model.encode(x)
        return step, sum(p.numel() for p in model.parameters()) / 1e6

    def make_step(nhwc, compiled: bool):
        if spec.get("encode"):
            return make_encode(nhwc, compiled)
        torch.manual_seed(0)
        loss_fn = VQLoss(args.pixel_loss, args.perceptual_weight, args.disc_weight, args.disc_start,
                         args.codebook_weight, args.lpips_vgg).to(device)
        model = VQGAN(cfg).to(device).train().channels_last(nhwc == torch.channels_last)
        forward = TV.compile_for_training(model) if compiled else model   # as train_vqgan.py --compile
        disc = PatchDiscriminator().to(device, memory_format=model.memory_format)
        fused = D.fused_optimizer(device)
        opt_g = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=fused)
        opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=fused)
        pos = [0]

        def step():
            x = default_collate([ds[(pos[0] + i) % len(ds)] for i in range(B)])["image"].to(device)
            x = x.contiguous(memory_format=model.memory_format)
            pos[0] += B
            with autocast:
                x_rec, _, qloss, _ = forward(x)
            disc.requires_grad_(False)
            g_loss, _ = loss_fn.generator_loss(x, x_rec.float(), qloss, gan_step, disc, model.last_layer)
            disc.requires_grad_(True)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt_g.step()
            with autocast:
                d_loss, _ = loss_fn.discriminator_loss(disc, x, x_rec.detach())
            opt_d.zero_grad(set_to_none=True)
            d_loss.float().backward()
            opt_d.step()
        return step, sum(p.numel() for p in model.parameters()) / 1e6

    steps = [make_step(*v) for v in variants]
    # The layouts take turns step by step, so the VM's speed drift hits each alike; a compiled variant's
    # first step (the compile) is timed on its own.
    timings, first_step = C.time_variants([st for st, _ in steps], device, spec["steps"], spec["warmup"],
                                          first_alone=bool(spec.get("compile")))
    rows = []
    for (nhwc, compiled), (_, params_m), tm in zip(variants, steps, timings):
        s = tm["median_s"]
        rows.append({"preset": name.removesuffix("-compile").removesuffix("-encode"), "resolution": cfg.resolution,
                     "grid": cfg.grid_size, "codes": cfg.n_codes, "params_m": params_m, "batch": B,
                     "precision": "bf16 autocast" if amp else "fp32",
                     "lpips": "–" if spec.get("encode") else "off (weight 0, no VGG16 weights)",
                     "memory_format": ("channels-last" if nhwc == torch.channels_last else "contiguous")
                                      + (", torch.compile" if compiled else ""),
                     "step_s": s, "min_s": tm["min_s"], "max_s": tm["max_s"], "times_s": tm["times_s"],
                     "repeats": spec["steps"], "images_per_s": B / s,
                     "what": "encode (no grad)" if spec.get("encode") else "GAN step",
                     "speedup_vs_second": C.round_ratio(timings[1]["times_s"], tm["times_s"])})
    for r, t in zip(rows, first_step):
        r["first_step_s"] = t
    return rows


COLUMNS = [("case", "preset"), ("resolution", "px"), ("params_m", "VQGAN params (M)"), ("batch", "batch"),
           ("precision", "precision"), ("lpips", "perceptual loss"), ("memory_format", "layout"),
           ("what", "timed"), ("step_s", "s (median)"), ("images_per_s", "images/s"),
           ("speedup_vs_second", "× second row"), ("first_step_s", "first step (s)"),
           ("peak_rss_mb", "peak RSS (MiB)")]
NOTES = ["Full GAN step: generator (pixel + codebook + adaptive GAN loss) and discriminator update, grad clip, "
         "Adam; batch fetch (Shapes render) included.",
         "LPIPS disabled (weight 0) everywhere: VGG16 weights are not available here; f16-16384's real recipe "
         "uses weight 1.0.",
         "layout: channels-last (NHWC weights and inputs, train_vqgan.py's default) or contiguous (NCHW). The two "
         "rows of a case take turns step by step; × second row is the median of the within-round ratios.",
         "shapes-compile (opt-in: --cases shapes-compile): channels-last eager vs the VQGAN torch.compile'd "
         "(train_vqgan.py --compile); first step (s) includes the compile."]


def main(argv=None):
    args = C.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    device = torch.device(args.device or C.best_device())
    cases = {n: (lambda n=n: run_case(n, args.quick, device)) for n in sizes(args.quick, device)}
    args.cases = args.cases or ",".join(n for n in cases if n not in OPT_IN)
    return C.run_cases("train_vqgan", args, cases, COLUMNS, __file__, NOTES)


if __name__ == "__main__":
    main()
