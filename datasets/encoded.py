"""Pre-encoded shards: each image's VQGAN token grid and CLIP embedding(s), computed once.

GPT training then spends no time in the frozen networks. A folder holds `shard-NNNNN.safetensors` files
and a `meta.json` written last. Shard k covers dataset items [k*S, (k+1)*S); ranks encode disjoint shards
in parallel (k = rank, rank + W, ...), each shard is written to a temporary file and renamed, and a shard
that exists is not encoded again (an interrupted run continues). A reader opens only a folder whose
meta.json lists every shard, so it never sees a half-written one.

Tensors per shard (N items): tokens (N, h, w) int16/int32, image_embed (N, D) float16 (L2-normalised),
index (N,) int64, and where the source has captions text_embed (N, D) float16 (for --cond text).

Shards outlive the networks that made them, so meta.json and every shard's metadata record which ones did
("models": fingerprints of the VQGAN's and CLIP's weights, models/fingerprint.py, and the precision):
preencode.py adds shards to a folder only if they match (check_resume; --overwrite clears it first), and
train_gpt.py reads a folder only with the VQGAN and CLIP that made it (check_models). A folder written
before fingerprints were recorded is refused by both, with a hint to re-encode it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from datasets.robust import DataError
from engine.checkpoint import atomic_write
from datasets.transforms import unpack_key
from models.fingerprint import fingerprint, short

META = "meta.json"
FORMAT = "clipgen-encoded-v1"
_SHARD = re.compile(r"shard-\d{5}\.safetensors")
_LABEL = {"vqgan": "VQGAN", "clip": "CLIP"}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def n_shards(n_items: int, shard_size: int) -> int:
    return (n_items + shard_size - 1) // shard_size


def write_shard(folder: Path, k: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Atomically write shard k (engine.checkpoint.atomic_write: a temporary file beside it, then a rename)."""
    atomic_write(folder / shard_name(k), lambda tmp: save_file({n: t.contiguous() for n, t in tensors.items()},
                                                              tmp, metadata={"info": json.dumps(info)}))


def write_meta(folder: Path, meta: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, **meta}, f, indent=1)

    atomic_write(folder / META, write)


def models_record(vqgan, clip, vqgan_source, clip_source, precision: str) -> dict:
    """What preencode.py stores in meta.json and each shard as "models": who encoded, and in what precision."""
    return {"vqgan": {"fingerprint": fingerprint(vqgan), "source": str(vqgan_source)},
            "clip": {"fingerprint": fingerprint(clip), "source": str(clip_source)}, "precision": precision}


def shard_info(path: Path) -> dict:
    """The info dict write_shard stored in a shard's header (the tensors are not read)."""
    try:
        with safe_open(path, "pt") as f:
            return json.loads((f.metadata() or {}).get("info", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}): re-run preencode.py with --overwrite") from None


def _older(path: Path) -> DataError:
    return DataError(f"{path} was written by an older preencode.py that recorded no fingerprint of its VQGAN "
                     f"and CLIP: re-run preencode.py with --overwrite to re-encode it")


def check_resume(folder: str | os.PathLike, record: dict) -> None:
    """Refuse to add shards to `folder` when the meta.json or any shard already there was made by another
    VQGAN, CLIP or precision than `record` (models_record) says, or by a version that recorded none."""
    folder = Path(folder)
    found = [(folder / META, read_meta(folder))] if (folder / META).is_file() else []
    found += [(p, shard_info(p)) for p in sorted(folder.glob("shard-*.safetensors")) if _SHARD.fullmatch(p.name)]
    for path, info in found:
        old = info.get("models")
        if old is None:
            raise _older(path)
        for name in ("vqgan", "clip"):
            if old[name]["fingerprint"] != record[name]["fingerprint"]:
                raise DataError(
                    f"{folder} holds shards encoded with another {_LABEL[name]} ({old[name]['source']}, "
                    f"fingerprint {short(old[name]['fingerprint'])}) than --{name} {record[name]['source']} "
                    f"({short(record[name]['fingerprint'])}): pass --overwrite to re-encode, or choose another --out")
        if old["precision"] != record["precision"]:
            raise DataError(f"{folder} holds shards encoded in {old['precision']}, not {record['precision']}: "
                            f"pass --precision {old['precision']} to continue them, or --overwrite to re-encode")


def clear(folder: str | os.PathLike) -> int:
    """Delete a folder's pre-encoded set for --overwrite: meta.json first (from then on no reader takes the
    folder for complete), then the shards and temporaries a killed run left. Other files are not touched.
    Returns how many shards were deleted."""
    folder = Path(folder)
    (folder / META).unlink(missing_ok=True)
    shards = [p for p in folder.glob("shard-*.safetensors") if _SHARD.fullmatch(p.name)]
    for p in shards + list(folder.glob(".shard-*.safetensors.*.tmp")) + list(folder.glob(f".{META}.*.tmp")):
        p.unlink(missing_ok=True)
    return len(shards)


def check_models(vqgan, clip, *sets: "EncodedShards") -> None:
    """Refuse pre-encoded sets that another VQGAN or CLIP made than the ones a run samples with: a GPT would
    learn one codebook's tokens and be decoded with another's. Each network is hashed once (~0.9 s for a
    ViT-B/32 CLIP), whatever the number of sets."""
    mine = {"vqgan": fingerprint(vqgan), "clip": fingerprint(clip)}
    for s in sets:
        old = s.meta.get("models")
        if old is None:
            raise _older(s.folder)
        for name, fp in mine.items():
            if old[name]["fingerprint"] != fp:
                raise DataError(
                    f"{s.folder} was encoded with another {_LABEL[name]} ({old[name]['source']}, fingerprint "
                    f"{short(old[name]['fingerprint'])}) than --{name} ({short(fp)}): re-run preencode.py "
                    f"--overwrite with this --{name}, or pass the {_LABEL[name]} the shards were made with")


# What readers take from meta.json, each a whole number of at least this (train_gpt.py compares the last three
# with its VQGAN and CLIP).
_META_COUNTS = {"n_shards": 1, "n_items": 1, "n_codes": 1, "grid_size": 1, "embed_dim": 1}


def read_meta(folder: str | os.PathLike) -> dict:
    """meta.json, checked: DataError (one line) when it is missing, unparsable or lacks what readers need."""
    path = Path(folder) / META
    if not path.is_file():
        raise DataError(f"{folder} holds no complete pre-encoded set ({META} missing): run preencode.py "
                        "to the end first")
    redo = "re-run preencode.py with --overwrite"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"cannot read {path} ({type(e).__name__}): {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} folder")
    for key, low in _META_COUNTS.items():
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"{path}: '{key}' is {'missing' if value is None else repr(value)[:40]}, not a whole "
                            f"number >= {low}: {redo}")
    if "models" in meta and not _models_ok(meta["models"]):
        raise DataError(f"{path}: its 'models' record is incomplete: {redo}")
    return meta


def _models_ok(models) -> bool:
    """models_record's shape: {"vqgan": {"fingerprint", "source"}, "clip": {...}, "precision"}."""
    return (isinstance(models, dict) and "precision" in models
            and all(isinstance(models.get(n), dict) and isinstance(models[n].get("fingerprint"), str)
                    and "source" in models[n] for n in _LABEL))


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's tensors; DataError for an empty, truncated or foreign file."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {str(e).strip()[:120]}): re-run preencode.py "
                        "with --overwrite") from None
    missing = [n for n in ("tokens", "image_embed", "index") if n not in tensors]
    if missing:
        raise DataError(f"{path} has no {missing[0]!r} tensor: it is not a preencode.py shard; re-run "
                        "preencode.py with --overwrite")
    return tensors


class EncodedShards(Dataset):
    """All shards of a folder, held in memory (tokens are small: 64 int16 per Shapes image).

    Items: {"tokens": (h, w) long, "image_embed": (D,) float32, "index": int, ["text_embed": (D,)]}.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        parts = []
        for k in range(self.meta["n_shards"]):
            path = self.folder / shard_name(k)
            if not path.is_file():
                raise DataError(f"{path} is missing although {META} lists it; re-run preencode.py")
            parts.append(load_shard(path))
        try:
            self.tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        except (KeyError, RuntimeError) as e:  # a tensor missing from one shard, or of another width
            raise DataError(f"{self.folder}: its shards do not fit together ({type(e).__name__}: "
                            f"{str(e).strip()[:120]}): re-run preencode.py with --overwrite") from None
        lengths = {name: len(t) for name, t in self.tensors.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"{self.folder}: its shards hold tensors of different lengths {lengths}: re-run "
                            "preencode.py with --overwrite")
        if len(self.tensors["index"]) != self.meta["n_items"]:
            raise DataError(f"{self.folder}: shards hold {len(self.tensors['index'])} items, "
                            f"{META} says {self.meta['n_items']}")

    @property
    def has_text(self) -> bool:
        return "text_embed" in self.tensors

    def __len__(self) -> int:
        return len(self.tensors["index"])

    def __getitem__(self, key) -> dict:
        i, _ = unpack_key(key)  # no augmentation: the seed is not needed
        item = {"tokens": self.tensors["tokens"][i].long(), "image_embed": self.tensors["image_embed"][i].float(),
                "index": int(self.tensors["index"][i])}
        if self.has_text:
            item["text_embed"] = self.tensors["text_embed"][i].float()
        return item
