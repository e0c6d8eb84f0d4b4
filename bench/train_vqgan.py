"""VQGAN training throughput: images/s of one full GAN step of train_vqgan.py (generator update with
pixel + codebook + adaptive-weighted GAN loss, then the PatchGAN discriminator update), per preset.

    python bench/train_vqgan.py                 # shapes (batch 16) and f16-16384 (batch 2 on CPU, 8 on GPU)

The step is train_vqgan.py's loop body with the GAN active (step past --disc-start), its preset defaults
(train_vqgan.parse_args), Adam betas (0.5, 0.9), grad clip, autocast from
engine.distributed.autocast_dtype('auto') (bf16 on CUDA and on CPUs with AMX / AVX512-BF16). The
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
            "f16-16384": dict(batch=8 if device.type == "cuda" else 2, steps=2, warmup=1)}


def run_case(name: str, quick: bool, device: torch.device) -> list[dict]:
    import train_vqgan as TV
    from datasets.shapes import ShapesDataset
    from models.discriminator import PatchDiscriminator
    from models.losses import VQLoss
    from models.vqgan import VQGAN

    spec = sizes(quick, device)[name]
    args = TV.parse_args(["--preset", name, "--perceptual-weight", "0", "--batch-size", str(spec["batch"])])
    cfg = TV.model_config(args)
    amp = D.autocast_dtype("auto", device)
    autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
    ds = ShapesDataset("unlabeled-train", length=1000, resolution=cfg.resolution)
    B, gan_step = spec["batch"], args.disc_start
    rows = []
    # train_vqgan.py's default (--channels-last) first, then the contiguous layout it replaces.
    for nhwc in (torch.channels_last, torch.contiguous_format):
        torch.manual_seed(0)
        loss_fn = VQLoss(args.pixel_loss, args.perceptual_weight, args.disc_weight, args.disc_start,
                         args.codebook_weight, args.lpips_vgg).to(device)
        model = VQGAN(cfg).to(device).train().channels_last(nhwc == torch.channels_last)
        disc = PatchDiscriminator().to(device, memory_format=nhwc)
        fused = D.fused_optimizer(device)
        opt_g = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=fused)
        opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=fused)
        pos = [0]

        def step():
            x = default_collate([ds[(pos[0] + i) % len(ds)] for i in range(B)])["image"].to(device)
            x = x.contiguous(memory_format=nhwc)
            pos[0] += B
            with autocast:
                x_rec, _, qloss, _ = model(x)
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

        tm = C.timeit(step, device, repeats=spec["steps"], warmup=spec["warmup"])
        s = tm["median_s"]
        rows.append({"preset": name, "resolution": cfg.resolution, "grid": cfg.grid_size, "codes": cfg.n_codes,
                     "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": B,
                     "precision": "bf16 autocast" if amp else "fp32", "lpips": "off (weight 0, no VGG16 weights)",
                     "memory_format": "channels-last" if nhwc == torch.channels_last else "contiguous",
                     "step_s": s, "min_s": tm["min_s"], "max_s": tm["max_s"], "repeats": spec["steps"],
                     "images_per_s": B / s})
    for r in rows:
        r["speedup_vs_contiguous"] = rows[1]["step_s"] / r["step_s"]
    return rows


COLUMNS = [("case", "preset"), ("resolution", "px"), ("params_m", "VQGAN params (M)"), ("batch", "batch"),
           ("precision", "precision"), ("lpips", "perceptual loss"), ("memory_format", "layout"),
           ("step_s", "s / GAN step (median)"), ("images_per_s", "images/s"),
           ("speedup_vs_contiguous", "× contiguous"), ("peak_rss_mb", "peak RSS (MiB)")]
NOTES = ["Full GAN step: generator (pixel + codebook + adaptive GAN loss) and discriminator update, grad clip, "
         "Adam; batch fetch (Shapes render) included.",
         "LPIPS disabled (weight 0) everywhere: VGG16 weights are not available here; f16-16384's real recipe "
         "uses weight 1.0.",
         "layout: channels-last (NHWC weights and inputs, train_vqgan.py's default) or contiguous (NCHW)."]


def main(argv=None):
    args = C.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    device = torch.device(args.device or C.best_device())
    cases = {n: (lambda n=n: run_case(n, args.quick, device)) for n in sizes(args.quick, device)}
    return C.run_cases("train_vqgan", args, cases, COLUMNS, __file__, NOTES)


if __name__ == "__main__":
    main()
