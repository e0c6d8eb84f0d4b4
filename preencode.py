"""Run the frozen VQGAN and CLIP over a dataset once; write shards of (token grid, CLIP embedding).

    python preencode.py --vqgan runs/vqgan-shapes/best.pt --clip runs/clip-shapes/best.pt --out runs/encoded
    torchrun --nproc_per_node 8 preencode.py --vqgan vqgan.pt --clip ViT-B-32:openai --dataset coco ...

Writes OUT/train and OUT/val (see datasets/encoded.py for the format); train_gpt.py --shards OUT reads
them. Processes encode disjoint shards in parallel; an interrupted run continues where it stopped.
It continues only shards the same VQGAN, CLIP and precision made (their fingerprints are stored with the
shards); --overwrite deletes the shards of other ones and encodes afresh.
Training items get the crop their index's seed gives (on-the-fly training draws a new crop every epoch).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import datasets
from datasets import encoded
from engine import distributed as D
from engine.cli import Parser, at_least, run
from models.clip import load_clip
from models.convert import load_vqgan

PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype -> name


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan", required=True, help="VQGAN checkpoint (ours, CLIP-GEN or taming)")
    p.add_argument("--clip", required=True, help="CLIP: checkpoint path or open_clip NAME:TAG")
    p.add_argument("--out", required=True, help="output folder (train/ and val/ are created in it)")
    datasets.add_data_args(p)
    p.add_argument("--shard-size", type=at_least(1), default=4096, help="items per shard")
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--num-workers", type=at_least(0), default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="fp32",
                   help="autocast for the frozen networks (fp32 keeps tokens identical to on-the-fly fp32)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the shards already in OUT/train and OUT/val and encode again (needed when "
                        "they were made with another VQGAN, CLIP or precision)")
    return p.parse_args(argv)


@torch.no_grad()
def encode_batch(vqgan, clip, batch: dict, device, autocast) -> dict[str, torch.Tensor]:
    images = batch["image"].to(device)
    with autocast:
        _, tokens, _, _ = vqgan.encode(images)
    out = {"tokens": tokens, "image_embed": clip.encode_image(images).half(), "index": batch["index"]}
    if "caption" in batch:
        out["text_embed"] = clip.encode_text(list(batch["caption"])).half()
    return out


def encode_split(dataset, folder: Path, vqgan, clip, args, env: D.DistEnv, autocast, log, models: dict) -> int:
    n, size = len(dataset), args.shard_size
    total = encoded.n_shards(n, size)
    token_dtype = torch.int16 if vqgan.cfg.n_codes <= 32767 else torch.int32
    done = 0
    for k in range(env.rank, total, env.world_size):
        if (folder / encoded.shard_name(k)).is_file():
            continue  # finished by an earlier run
        items = torch.utils.data.Subset(dataset, range(k * size, min((k + 1) * size, n)))
        loader = torch.utils.data.DataLoader(items, batch_size=args.batch_size, num_workers=args.num_workers)
        parts = [encode_batch(vqgan, clip, b, env.device, autocast) for b in loader]
        tensors = {name: torch.cat([p[name].cpu() for p in parts]) for name in parts[0]}
        tensors["tokens"] = tensors["tokens"].to(token_dtype)
        info = {"first": k * size, "n": len(tensors["index"]), "models": models}
        encoded.write_shard(folder, k, tensors, info)
        done += 1
        log(f"{folder.name}: shard {k + 1}/{total} ({len(tensors['index'])} items)")
    return done


def main(args) -> None:
    env = D.setup(args.device)
    vqgan = load_vqgan(args.vqgan).to(env.device).requires_grad_(False).channels_last()
    clip = load_clip(args.clip, device=env.device)
    amp = D.autocast_dtype(args.precision, env.device)
    autocast = torch.autocast(env.device.type, dtype=amp or torch.float32, enabled=amp is not None)
    train_ds, val_ds = datasets.build_datasets(args, vqgan.cfg.resolution)
    log = print if env.is_main else (lambda *a: None)
    t0 = time.time()
    out = Path(args.out)
    models = encoded.models_record(vqgan, clip, args.vqgan, args.clip, PRECISION_NAMES[amp])
    for split in ("train", "val"):  # before anything is written
        if not args.overwrite:
            encoded.check_resume(out / split, models)  # every rank reads the same files: all refuse together
        elif env.is_main and (n := encoded.clear(out / split)):
            log(f"{split}: deleted {n} shards encoded earlier (--overwrite)")
    D.barrier()  # the deletions are done before any rank looks for finished shards
    for split, ds in (("train", train_ds), ("val", val_ds)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        encode_split(ds, folder, vqgan, clip, args, env, autocast, log, models)
        D.barrier()
        if env.is_main:
            encoded.write_meta(folder, {
                "n_items": len(ds), "n_shards": encoded.n_shards(len(ds), args.shard_size),
                "shard_size": args.shard_size, "vqgan": str(args.vqgan), "clip": str(args.clip), "models": models,
                "n_codes": vqgan.cfg.n_codes, "grid_size": vqgan.cfg.grid_size, "embed_dim": clip.embed_dim,
                "dataset": args.dataset, "shapes_split": getattr(args, "shapes_split", None),
                "has_text": "caption" in ds[0]})
        D.barrier()
    log(f"done: encoded {len(train_ds)} train and {len(val_ds)} val items into {out} "
        f"in {time.time() - t0:.0f} s")
    D.cleanup()


if __name__ == "__main__":
    run(main, parse_args())
