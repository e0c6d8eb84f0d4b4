"""GPT training throughput: a step fed from pre-encoded shards vs a step that encodes the images with the
frozen VQGAN and CLIP on the fly (train_gpt.py's two data paths), same model, batch and machine.

    python bench/train_gpt.py                  # presets tiny and small, batch 64, shipped Shapes models

Both paths time the whole step as train_gpt.py runs it: fetch + collate the batch (Shapes images are
rendered, shard items are read from memory), train_gpt.Conditioner (tokens and CLIP image embedding;
VQGAN encode under the trainer's autocast), the condition-drop mask, forward under autocast
(engine.distributed.autocast_dtype('auto'): bf16 on CUDA and on CPUs with AMX), cross
entropy, backward, grad clipping (1.0), AdamW (GPT-2 groups, betas 0.9/0.95), EMA update (0.999).
Data loading runs in the main process here (the trainer's default --num-workers 1 overlaps it with the
step; rendering a Shapes batch is a small part either way). The shards are written with
datasets.encoded (the format preencode.py writes) to a temporary folder and read back with EncodedShards.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from bench import common as C  # noqa: E402
from engine import distributed as D  # noqa: E402

SHAPES = C.REPO / "pretrained" / "shapes"


def sizes(quick: bool) -> dict:
    if quick:
        return {"tiny": dict(preset="tiny", batch=4, steps=1, warmup=1, items=8)}
    return {"tiny": dict(preset="tiny", batch=64, steps=5, warmup=2, items=512),
            "small": dict(preset="small", batch=64, steps=3, warmup=1, items=256),
            # CLIP-GEN's sizes: the f16-16384 VQGAN at 256 px (16x16 tokens) and a ViT-B/32 CLIP, random
            # weights (timing only: neither can be downloaded here), the 8x512 GPT over 256 tokens.
            "clipgen-size": dict(preset="small", batch=8, steps=4, warmup=1, items=40, frozen="clipgen"),
            # The fast paths one by one, from shards only: PyTorch's dropout and foreach AdamW (before),
            # the project's CPU dropout mask, then fused AdamW (= train_gpt.py today).
            "clipgen-ablation": dict(preset="small", batch=8, steps=4, warmup=1, items=40, frozen="clipgen",
                                     ablation=True),
            # Opt-in (--cases clipgen-compile): the shards step eager vs torch.compile'd (train_gpt --compile);
            # the first compiled step includes the compile.
            "clipgen-compile": dict(preset="small", batch=8, steps=4, warmup=1, items=40, frozen="clipgen",
                                    compile=True),
            # Opt-in, for a GPU (bench/gpu.sh): CLIP-GEN's gpt2-medium GPT over 256 tokens in bf16, eager and
            # compiled: the MFU target (>= 40%).
            "gpt2-medium-mfu": dict(preset="gpt2-medium", batch=32, steps=8, warmup=2, items=64, frozen="clipgen",
                                    compile=True)}


OPT_IN = {"clipgen-compile", "gpt2-medium-mfu"}  # minutes on a CPU: run only when named


VIT_B_32 = {"embed_dim": 512,
            "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "head_width": 64},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}


def frozen_models(kind: str, device: torch.device):
    """(vqgan, clip): the shipped Shapes pair, or random-weight models of CLIP-GEN's sizes."""
    from models.clip import CLIP, build_for_inference, load_clip
    from models.convert import load_vqgan

    if kind == "shapes":
        return (load_vqgan(str(SHAPES / "vqgan.safetensors")).to(device).eval().requires_grad_(False).channels_last(),
                load_clip(str(SHAPES / "clip.safetensors"), device=device))
    from models.vqgan import PRESETS, VQGAN

    torch.manual_seed(0)
    vqgan = VQGAN(PRESETS["f16-16384"]).to(device).eval().requires_grad_(False).channels_last()
    return vqgan, CLIP(build_for_inference(VIT_B_32)).to(device)


@contextlib.contextmanager
def torch_dropout(enabled: bool):
    """Within: the GPT uses PyTorch's dropout and SDPA's dropout (what models/dropout.py replaced on CPUs)."""
    if not enabled:
        yield
        return
    import models.dropout as MD
    import models.gpt as MG

    saved = MD.dropout, MG.attention
    MD.dropout = lambda x, p, training=True: F.dropout(x, p, training)
    MG.attention = lambda q, k, v, attn_mask=None, is_causal=False, p=0.0: F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=p)
    try:
        yield
    finally:
        MD.dropout, MG.attention = saved


def make_shards(dataset, vqgan, clip, conditioner_autocast, device, folder: Path, shard_size: int = 256) -> None:
    from datasets.encoded import n_shards, write_meta, write_shard
    from preencode import encode_batch

    n = len(dataset)
    for k in range(n_shards(n, shard_size)):
        batch = default_collate([dataset[i] for i in range(k * shard_size, min(n, (k + 1) * shard_size))])
        with torch.no_grad():
            t = encode_batch(vqgan, clip, batch, device, conditioner_autocast)
        t = {"tokens": t["tokens"].to(torch.int16).cpu(), "image_embed": t["image_embed"].cpu(),
             "index": t["index"].long()}
        write_shard(folder, k, t, {})
    write_meta(folder, {"n_items": n, "n_shards": n_shards(n, shard_size), "shard_size": shard_size,
                        "n_codes": vqgan.cfg.n_codes, "grid_size": vqgan.cfg.grid_size, "embed_dim": clip.embed_dim})


def run_case(name: str, quick: bool, device: torch.device) -> list[dict]:
    from datasets.encoded import EncodedShards
    from datasets.shapes import ShapesDataset
    from engine.ema import EMA
    from models.gpt import GPT, build_gpt
    from train_gpt import Conditioner, noisy

    spec = sizes(quick)[name]
    B = spec["batch"]
    vqgan, clip = frozen_models(spec.get("frozen", "shapes"), device)
    amp = D.autocast_dtype("auto", device)
    autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
    conditioner = Conditioner(vqgan, clip, "image", device, autocast)
    images = ShapesDataset("unlabeled-train", length=spec["items"], resolution=vqgan.cfg.resolution)
    tmp = tempfile.TemporaryDirectory()
    make_shards(images, vqgan, clip, autocast, device, Path(tmp.name))
    shards = EncodedShards(tmp.name)

    torch.manual_seed(0)
    cfg = build_gpt(spec["preset"], vocab_size=vqgan.cfg.n_codes, n_tokens=vqgan.cfg.grid_size ** 2,
                    cond_dim=clip.embed_dim).cfg
    fused = D.fused_optimizer(device)
    if spec.get("ablation"):
        variants = [("pre-encoded shards", shards, "torch", False), ("pre-encoded shards", shards, "project", False),
                    ("pre-encoded shards", shards, "project", fused)]
    elif spec.get("compile"):
        variants = [("pre-encoded shards", shards, "project", fused),
                    ("pre-encoded shards", shards, "project compiled", fused)]
    else:
        variants = [("on the fly (VQGAN + CLIP encode)", images, "project", fused),
                    ("pre-encoded shards", shards, "project", fused)]
    def make_step(ds, dropout_impl: str, fused_opt: bool):
        torch.manual_seed(0)
        model = GPT(cfg).to(device).train()
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95), fused=fused_opt)
        ema = EMA(model, 0.999)
        forward = torch.compile(model) if dropout_impl.endswith("compiled") else model
        pos = [0]

        def step():
            idx = [(pos[0] + i) % len(ds) for i in range(B)]
            pos[0] += B
            tokens, cond = conditioner(default_collate([ds[i] for i in idx]))
            cond = noisy(cond, 0.0)
            drop = torch.rand(cond.shape[0], device=device) < 0.1
            with torch_dropout(dropout_impl == "torch"):
                with autocast:
                    logits = forward(tokens, cond, drop)
                loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema.update(model)
        return step, sum(p.numel() for p in model.parameters()) / 1e6

    steps = [make_step(ds, impl, fo) for _, ds, impl, fo in variants]
    # The variants take turns step by step, so the VM's speed drift hits each alike; a compiled variant's
    # first step (the compile) is timed on its own.
    timings, first_step = C.time_variants([st for st, _ in steps], device, spec["steps"], spec["warmup"],
                                          first_alone=bool(spec.get("compile")))
    peak = C.peak_bf16_tflops(device)
    rows = []
    for (path, _, dropout_impl, fused_opt), (_, params_m), tm in zip(variants, steps, timings):
        s = tm["median_s"]
        tflops = C.gpt_train_flops_per_token(cfg) * B * cfg.n_tokens / s / 1e12   # GPT only, not the encoders
        rows.append({"preset": spec["preset"], "layers": cfg.n_layer, "width": cfg.n_embd,
                     "params_m": params_m, "batch": B,
                     "tokens": cfg.n_tokens, "data": path, "precision": "bf16 autocast" if amp else "fp32",
                     "step_s": s, "min_s": tm["min_s"], "max_s": tm["max_s"], "times_s": tm["times_s"],
                     "repeats": spec["steps"], "tokens_per_s": B * cfg.n_tokens / s, "images_per_s": B / s,
                     "gpt_tflops": tflops, "mfu": tflops / peak if peak and amp else None,
                     "fast_paths": ("PyTorch dropout" if dropout_impl == "torch" else "project dropout")
                                   + (", fused AdamW" if fused_opt else ", foreach AdamW")
                                   + (", torch.compile" if dropout_impl.endswith("compiled") else "")})
    for r, t in zip(rows, first_step):
        r["first_step_s"] = t
    first = timings[0]["times_s"]
    if spec.get("ablation") or spec.get("compile"):
        for r, tm in zip(rows, timings):
            r["speedup_vs_first"] = C.round_ratio(first, tm["times_s"])
    else:
        rows[0]["speedup_vs_on_the_fly"] = 1.0
        rows[1]["speedup_vs_on_the_fly"] = C.round_ratio(first, timings[1]["times_s"])
    tmp.cleanup()
    return rows


COLUMNS = [("case", "preset"), ("params_m", "GPT params (M)"), ("batch", "batch"), ("data", "data path"),
           ("precision", "precision"), ("step_s", "s / step (median)"), ("tokens_per_s", "tokens/s"),
           ("images_per_s", "images/s"), ("speedup_vs_on_the_fly", "× on the fly"), ("fast_paths", "fast paths"),
           ("speedup_vs_first", "× first row"), ("first_step_s", "first step (s)"),
           ("gpt_tflops", "GPT TFLOP/s"), ("mfu", "MFU"),
           ("peak_rss_mb", "peak RSS (MiB)")]
NOTES = ["tiny, small: the shipped Shapes VQGAN (64x64 -> 8x8 tokens, 512 codes) and CLIP (64-d); clipgen-size: "
         "random-weight f16-16384 VQGAN (256 px -> 16x16 tokens of 16384 codes) and ViT-B/32 CLIP, the 8x512 GPT; "
         "GPT from scratch.",
         "Step = batch fetch + collate (in the main process) + Conditioner + fwd/bwd under autocast + clip + "
         "AdamW + EMA, as train_gpt.py; median of the timed steps after warm-up. The paths of a case take turns "
         "step by step; × on the fly / × first row is the median over rounds of the within-round ratio.",
         "peak RSS: per preset (fresh subprocess), covering both paths.",
         "clipgen-ablation: the clipgen-size GPT step from shards with the CPU fast paths added one at a time "
         "(PyTorch's dropout = bernoulli_ masks and SDPA's dropout; project dropout = models/dropout.py).",
         "clipgen-compile (opt-in: --cases clipgen-compile): the same step eager and with the GPT torch.compile'd "
         "(train_gpt.py --compile); first step (s) includes the compile.",
         "GPT TFLOP/s: model FLOPs of the GPT step (bench.common.gpt_train_flops_per_token: 6 per weight per token "
         "plus attention) over the whole step time; MFU: that over the device's dense bf16 peak (known GPUs "
         "only; none for CPUs)."]


def main(argv=None):
    args = C.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    device = torch.device(args.device or C.best_device())
    cases = {n: (lambda n=n: run_case(n, args.quick, device)) for n in sizes(args.quick)}
    args.cases = args.cases or ",".join(n for n in cases if n not in OPT_IN)
    return C.run_cases("train_gpt", args, cases, COLUMNS, __file__, NOTES)


if __name__ == "__main__":
    main()
