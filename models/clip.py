"""CLIP: the frozen image/text encoder every stage shares, as one wrapper over open_clip.

    clip = load_clip("runs/clip-shapes/best.pt")        # a checkpoint written by train_clip.py
    clip = load_clip("clip_vit_b32.pt")                 # an OpenAI-format state dict (CLIP-GEN's release)
    clip = load_clip("ViT-B-32:openai")                 # open_clip name:tag (downloads or reads its cache)
    e_img = clip.encode_image(images)                   # (B, 3, H, W) in [-1, 1] -> (B, D), unit norm
    e_txt = clip.encode_text(["a red circle"])          # list of str -> (B, D), unit norm

The GPT is trained on image embeddings and sampled from text embeddings, so both must come out of the
same space the same way: float32 and L2-normalised, whatever precision the caller runs under. Images
arrive in the VQGAN's range [-1, 1]; CLIP's own resize and mean/std normalisation happen here, once. The
mean/std belong to the weights: OpenAI's for OpenAI-format and open_clip weights, the checkpoint's own for
train_clip.py's (the Shapes CLIP maps white to 0).
"""
from __future__ import annotations

import copy
import functools
import os
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine import checkpoint as ckpt
from engine.checkpoint import CheckpointError
from models import clip_lite
from models.clip_lite import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

# open_clip itself is imported only where it is needed (training, pretrained names, OpenAI state dicts,
# configs beyond the plain ViT): importing it costs ~1.5 s (torchvision, torch._dynamo, timm), and loading
# the project's own CLIP checkpoints for inference does without it (models/clip_lite.py).

DEFAULT_PREPROCESS = {"mean": tuple(OPENAI_DATASET_MEAN), "std": tuple(OPENAI_DATASET_STD)}


# --------------------------------------------------------------------------------------------------
# Building blocks shared with train_clip.py

def build_open_clip(config: dict) -> nn.Module:
    """An open_clip model (random weights) from a model config dict, the format of open_clip's
    model_configs/*.json: {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"?, "custom_text"?}."""
    import open_clip

    cfg = copy.deepcopy(config)
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    return cls(**cfg)


def build_for_inference(config: dict) -> nn.Module:
    """The same model as build_open_clip(config), without importing open_clip when the config is a
    plain ViT CLIP (clip_lite.is_lite); parameter names and outputs are the same either way."""
    return clip_lite.build_lite(config) if clip_lite.is_lite(config) else build_open_clip(config)


@functools.lru_cache(maxsize=8)
def _simple_tokenizer(context_length: int):
    return clip_lite.tokenizer_module().SimpleTokenizer(context_length=context_length)


def _is_simple_tokenizer(tokenizer) -> bool:
    """open_clip's SimpleTokenizer, from open_clip or loaded on its own by clip_lite (two classes)."""
    return type(tokenizer).__name__ == "SimpleTokenizer" and hasattr(tokenizer, "sot_token_id")


def tokenizer_for(config: dict):
    """The tokenizer a model config calls for: open_clip's default BPE unless it names a HF tokenizer."""
    text_cfg = config.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        import open_clip

        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return _simple_tokenizer(context_length)


def tokenize(tokenizer, texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, list[int]]:
    """(B, context_length) token ids, and per text how many of its tokens did not fit.

    Same ids as open_clip's SimpleTokenizer (start token, BPE, end token, zero padding; an over-long
    text keeps its first context_length - 1 tokens and the end token), but it counts what it cuts, which
    open_clip does silently. Other tokenizers (HF) are called as they are and report nothing dropped."""
    if not _is_simple_tokenizer(tokenizer) or tokenizer.reduction_fn is not None:
        return tokenizer(list(texts), context_length=context_length), [0] * len(texts)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    ids = [[sot] + tokenizer.encode(t) + [eot] for t in texts]
    out = torch.zeros(len(ids), context_length, dtype=torch.long)
    dropped = []
    for i, x in enumerate(ids):
        dropped.append(max(0, len(x) - context_length))
        if dropped[-1]:
            x = x[:context_length - 1] + [eot]
        out[i, :len(x)] = torch.tensor(x)
    return out, dropped


def to_clip_pixels(images: torch.Tensor, image_size: tuple[int, int], mean: torch.Tensor,
                   std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, S, S) as CLIP's tower expects: CLIP's own preprocessing (shorter
    side resized to S with antialiased bicubic, centre crop, clamp to [0, 1] as an 8-bit image would be,
    then (x - mean) / std). mean, std: (1, 3, 1, 1)."""
    x = (images.float().clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]
    h, w = x.shape[-2:]
    th, tw = image_size
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        size = (max(th, int(h * scale)), max(tw, int(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = int(round((size[0] - th) / 2)), int(round((size[1] - tw) / 2))
        x = x[..., top:top + th, left:left + tw]
    return (x - mean) / std


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _embed_dim(model: nn.Module) -> int:
    visual = model.visual
    if getattr(visual, "output_dim", None):
        return int(visual.output_dim)
    proj = getattr(model, "text_projection", None)
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1])


# --------------------------------------------------------------------------------------------------
# The wrapper

class CLIP(nn.Module):
    """A frozen open_clip model with the project's two calls: encode_image and encode_text.

    It never leaves eval mode (train() is a no-op) and holds no trainable parameters, so a stage that
    owns it can call .train() on itself and hand its own parameters to an optimizer safely."""

    def __init__(self, model: nn.Module, tokenizer=None, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                 source: str = ""):
        super().__init__()
        self.model = model.float()
        self.model.eval().requires_grad_(False)
        self.context_length = int(model.context_length)
        self.tokenizer = tokenizer if tokenizer is not None else _simple_tokenizer(self.context_length)
        h, w = _pair(model.visual.image_size)
        self.image_size = h if h == w else (h, w)
        self.embed_dim = _embed_dim(model)
        self.source = source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.eval()  # nn.Module starts in training mode; this wrapper never is

    def train(self, mode: bool = True) -> "CLIP":
        return super().train(False)  # frozen: eval() always, whatever a parent module asks

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def extra_repr(self) -> str:
        return (f"source={self.source!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, "
                f"context_length={self.context_length}")

    # Lower level: already-preprocessed inputs in, raw (unnormalised) features out.
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, S, S) normalised pixels."""
        return to_clip_pixels(images.to(self.device), _pair(self.image_size), self.mean, self.std)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, D) unnormalised float32 features."""
        return self.model.encode_image(pixels.to(self.device)).float()

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context_length) token ids -> (B, D) unnormalised float32 features."""
        return self.model.encode_text(tokens.to(self.device)).float()

    def tokenize(self, texts: str | Sequence[str], _stacklevel: int = 2) -> torch.Tensor:
        """(B, context_length) token ids; an over-long text is cut, with one warning for the whole call."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens, dropped = tokenize(self.tokenizer, texts, self.context_length)
        cut = [(d, t) for d, t in zip(dropped, texts) if d]
        if cut:
            worst, text = max(cut)
            warnings.warn(f"{len(cut)} of {len(texts)} text(s) exceed CLIP's context of {self.context_length} "
                          f"tokens and were truncated, dropping {sum(d for d, _ in cut)} token(s) in all "
                          f"(up to {worst} from {text[:60]!r})", stacklevel=_stacklevel)
        return tokens

    # The project's interface: float32, L2-normalised, no gradients.
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D) unit-norm float32 embeddings."""
        return F.normalize(self.image_features(self.preprocess(images)), dim=-1)

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """list of B strings -> (B, D) unit-norm float32 embeddings."""
        tokens = self.tokenize(texts, _stacklevel=3)  # a truncation warning points at the caller
        with torch.no_grad():
            return F.normalize(self.text_features(tokens), dim=-1)


# --------------------------------------------------------------------------------------------------
# Loading

def load_clip(spec, device: str | torch.device | None = None) -> CLIP:
    """A frozen CLIP from any of:
      - a checkpoint written by train_clip.py ({"kind": "clip", "open_clip_config", "model", ...});
      - an OpenAI-format state dict file (visual.*, transformer.resblocks.*, ...; fp16 is fine);
      - an open_clip pretrained model: "NAME:TAG" or (NAME, TAG), e.g. "ViT-B-32:openai", or
        "hf-hub:ORG/REPO". These need the weights downloadable or already in open_clip's cache.
    Anything a user can get wrong raises CheckpointError with one line."""
    if isinstance(spec, CLIP):
        clip = spec
    elif isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise CheckpointError(f"an open_clip model is given as (NAME, TAG), got {spec!r}")
        clip = from_pretrained(*spec)
    else:
        text = os.fspath(spec)
        if text.startswith(("hf-hub:", "local-dir:")):
            clip = from_pretrained(text, None)
        elif Path(text).is_file() or looks_like_path(text):
            clip = from_file(text)
        elif ":" in text:
            clip = from_pretrained(*text.split(":", 1))
        else:
            raise CheckpointError(f"{text!r} is neither a checkpoint file nor an open_clip NAME:TAG such as "
                                  f"ViT-B-32:openai")
    return clip.to(device) if device is not None else clip


def looks_like_path(text: str) -> bool:
    """Whether load_clip reads `text` as a file (so a missing one is "not found"): not an hf-hub:/local-dir:
    name, and a path or a checkpoint's file name rather than an open_clip NAME:TAG."""
    if text.startswith(("hf-hub:", "local-dir:")):
        return False
    return os.sep in text or "/" in text or text.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors"))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def from_pretrained(name: str, tag: str | None) -> CLIP:
    """open_clip.create_model(name, pretrained=tag): a built-in name and a weights tag (or a file path),
    or an hf-hub:/local-dir: name with no tag."""
    if not tag and not name.startswith(("hf-hub:", "local-dir:")):
        raise CheckpointError(f"open_clip model {name!r} needs pretrained weights: give NAME:TAG, "
                              f"e.g. {name}:openai (open_clip.list_pretrained() lists them)")
    import open_clip

    try:
        model = open_clip.create_model(name, pretrained=tag, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # no network, no cache, unknown name or tag: all say the same to the user
        raise CheckpointError(f"cannot load open_clip {name}{':' + tag if tag else ''} ({_first_line(e)}); "
                              f"fetch the weights where there is network (open_clip caches them), or "
                              f"pass a local checkpoint file") from None
    pp = getattr(model.visual, "preprocess_cfg", DEFAULT_PREPROCESS)
    return CLIP(model, tokenizer, pp["mean"], pp["std"], source=f"{name}:{tag}" if tag else name)


def from_file(path: str | os.PathLike) -> CLIP:
    """A train_clip.py checkpoint or an OpenAI-format state dict, told apart by their contents."""
    path = Path(path)
    if path.is_file() and _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (OpenAI's JIT release), which is code, not data; convert it once, "
            f"where you trust it, to a state dict: torch.save(torch.jit.load(path, map_location='cpu')"
            f".state_dict(), 'clip_state_dict.pt'), then load that")
    if path.suffix == ".safetensors":  # export.py's weights file: {'kind', 'config', 'model', 'preprocess'}
        w = ckpt.read_weights(path)
        state = {"kind": w["kind"], "open_clip_config": w["config"], "model": w["model"]}
        if "preprocess" in w:
            state["preprocess"] = w["preprocess"]
    else:
        state = ckpt.load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a CLIP checkpoint or state dict")
    if "kind" in state:
        if state["kind"] != "clip":
            raise CheckpointError(f"{path} is a {state['kind']} checkpoint, not a CLIP checkpoint")
        return from_checkpoint(state, source=str(path))
    for key in ("state_dict", "model"):  # a state dict saved inside a wrapper dict
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "visual.proj" not in state and "visual.attnpool.positional_embedding" not in state:
        raise CheckpointError(f"{path} is neither a train_clip.py checkpoint (kind 'clip') nor an OpenAI-format "
                              f"CLIP state dict (no visual.proj key)")
    return from_openai_state_dict(state, source=str(path))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


def from_openai_state_dict(state: dict, source: str = "") -> CLIP:
    """OpenAI's layout (as CLIP-GEN ships it), QuickGELU, computed in float32 from the (fp16) weights."""
    from open_clip.model import build_model_from_openai_state_dict

    try:
        # cast_dtype=None: plain LayerNorms, as the model runs in float32 (fp16 weights are upcast exactly).
        model = build_model_from_openai_state_dict(dict(state), quick_gelu=True, cast_dtype=None)
    except (KeyError, RuntimeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source or 'state dict'} does not fit OpenAI's CLIP layout "
                              f"({_first_line(e)})") from None
    return CLIP(model, None, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, source=source)


def from_checkpoint(state: dict, source: str = "") -> CLIP:
    """A train_clip.py checkpoint; its EMA weights when it has them."""
    try:
        config = state["open_clip_config"]
        model = build_for_inference(config)
        model.load_state_dict(state.get("ema") or state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{source or 'checkpoint'} is a broken CLIP checkpoint ({_first_line(e)})") from None
    pp = _preprocess(state.get("preprocess", DEFAULT_PREPROCESS), source)
    return CLIP(model, tokenizer_for(config), pp["mean"], pp["std"], source=source)


def _preprocess(pp, source: str) -> dict:
    """A checkpoint's pixel normalisation, checked: {'mean': 3 numbers, 'std': 3 non-zero numbers}."""
    def three(key: str) -> bool:
        v = pp.get(key) if isinstance(pp, dict) else None
        return (isinstance(v, (list, tuple)) and len(v) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))

    if not (three("mean") and three("std")) or 0 in pp["std"]:
        raise CheckpointError(f"{source or 'checkpoint'} has a broken 'preprocess' entry ({str(pp)[:80]}): "
                              "expected {'mean': [3 numbers], 'std': [3 non-zero numbers]}")
    return pp
