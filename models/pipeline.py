"""Text (or an image embedding) -> CLIP -> GPT candidates -> VQGAN -> CLIP re-ranking, in one object.

    pipe = TextToImage.from_paths(vqgan="...", gpt="...", clip="...")
    result = pipe("a red circle in the top left", n_candidates=16, keep=4, seed=0)
    result.images   # (keep, 3, H, W) in [-1, 1], best first;  result.scores: CLIP similarity to the text

    pipe = TextToImage.from_folder("pretrained/shapes")   # vqgan/gpt/clip.safetensors from one folder
    pipe = TextToImage.from_folder("pretrained/shapes", prior="flow")   # flow.safetensors in place of the GPT
    pipe("a red circle", n_candidates=16, keep=4, seed=0).save("sample.png")   # grid + sample_0.png, ...
    pipe.variations("picture.png", keep=4)                # condition on a picture's CLIP image embedding
    pipe.interpolate("a red circle", "a blue square", steps=8)   # one image per step, same seed each

evaluate.py and demo.py both sample through this class. The stage-2 prior (`pipe.gpt`) is either the GPT
or the flow-matching prior (models/flow.py): both have `sample(cond, ...)` -> token grids; the flow's ODE
steps and solver are its attributes `steps` and `solver`. Guidance (cfg_scale != 1) on a GPT whose null
condition was never trained (one imported from CLIP-GEN) raises GuidanceError, a CheckpointError.
SAMPLING_PRESETS names sampling settings; default_sampling(gpt.cfg) is the one a GPT calls for:

    pipe(prompt, **SAMPLING_PRESETS[default_sampling(pipe.gpt.cfg)], keep=4)
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine import distributed as D
from engine.checkpoint import CheckpointError, atomic_write
from engine.images import decode_rgb
from models.clip import CLIP, load_clip
from models.convert import load_vqgan
from models.flow import FlowPrior, check_codebook, load_prior, vqgan_codebook
from models import packed
from models.gpt import GPT, GPTConfig
from models.refine import RefineConfig, refine as refine_tokens
from models.vqgan import VQGAN

# Named sampling settings (demo.py --sampling), as keyword arguments of TextToImage.__call__/generate.
SAMPLING_PRESETS: dict[str, dict] = {
    # The Shapes models (a 32-code to 1024-code vocabulary): the full distribution, 16 candidates.
    "shapes": {"n_candidates": 16, "top_k": None, "top_p": None, "temperature": 1.0},
    # CLIP-GEN's own settings for its COCO GPT (16384 codes): top-k 500, then a 0.95 nucleus, 64 candidates.
    "clipgen": {"n_candidates": 64, "top_k": 500, "top_p": 0.95, "temperature": 1.0},
}


def default_sampling(cfg: GPTConfig) -> str:
    """The SAMPLING_PRESETS name a GPT is sampled with unless told otherwise: its origin's."""
    return "clipgen" if cfg.origin == "clipgen" else "shapes"


@dataclass
class Generation:
    images: torch.Tensor   # (K, 3, H, W) in [-1, 1], sorted by score when re-ranked
    scores: torch.Tensor   # (K,) cosine similarity between each image's CLIP embedding and the condition
    tokens: torch.Tensor   # (K, h, w)

    def save(self, path: str | os.PathLike, ncol: int | None = None, padding: int = 2) -> list[Path]:
        """The images as one grid PNG at `path` and each beside it (see save_images); returns the paths."""
        return save_images(self.images, path, ncol=ncol, padding=padding)


class TextToImage:
    STAGES = ("vqgan", "gpt", "clip")  # from_folder reads <stage>.safetensors
    PRIORS = ("gpt", "flow")            # from_folder's prior: gpt.safetensors or flow.safetensors

    def __init__(self, vqgan: VQGAN, gpt: GPT | FlowPrior, clip: CLIP, device: torch.device | str | None = None,
                 precision: str = "auto"):
        self.device = torch.device(device) if device else D.pick_device(None)
        self.vqgan = vqgan.to(self.device).eval().requires_grad_(False)
        self.gpt = gpt.to(self.device).eval().requires_grad_(False)
        self.clip = clip.to(self.device)
        grid = vqgan.cfg.grid_size
        if gpt.cfg.n_tokens != grid * grid or gpt.cfg.vocab_size != vqgan.cfg.n_codes:
            raise ValueError(f"the GPT writes {gpt.cfg.n_tokens} tokens of {gpt.cfg.vocab_size} codes; the "
                             f"VQGAN decodes {grid * grid} tokens of {vqgan.cfg.n_codes} codes")
        if gpt.cfg.cond_dim != clip.embed_dim:
            raise ValueError(f"the GPT takes {gpt.cfg.cond_dim}-d conditions; the CLIP gives {clip.embed_dim}-d")
        check_codebook(gpt, vqgan)
        amp = D.autocast_dtype(precision, self.device) if self.device.type == "cuda" else None
        self._amp = amp
        if self.device.type == "cpu" and (precision == "bf16" or precision == "auto" and bf16_weights_pay(gpt)):
            # On a CPU a decode step is bound by reading the weights: storing the GPT in bf16 halves that
            # where the CPU computes in bf16 (a Xeon with AMX: 1.9x fp32 F.linear for an 8x512 GPT), where
            # autocast would re-cast fp32 weights every step. The default only where it pays (see
            # bf16_weights_pay): on CPUs without bf16 instructions it is slower than fp32.
            self.gpt = self.gpt.to(torch.bfloat16)
        if isinstance(self.gpt, FlowPrior):  # snap to exactly the codes the VQGAN decodes, in fp32
            self.gpt.codebook = vqgan_codebook(self.vqgan).to(self.device)
        self._gpt_dtype = next(self.gpt.parameters()).dtype
        self.refine_threads: int | None = None  # CPU threads for refinement (None: as set); demo.py sets it
        # The GPT's decoder: None (one token per forward), "sjd" (speculative Jacobi decoding, `window`
        # drafts verified per forward: the same distribution in fewer forwards; models/gpt.py sample_sjd)
        # or "zipar" (row-parallel: a row starts once the row above has `window` tokens; sample_zipar).
        # window None: the decoder's default (models.gpt.decoding_window).
        self.parallel: str | None = None
        self.window: int | None = None
        self.step = "eager"  # one-token steps: "eager", "static" or "cuda-graph" (GPT.sample's step)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device=None, precision: str = "auto",
                    use_ema: bool = True, prior: str = "gpt") -> "TextToImage":
        """The three stages from vqgan.safetensors, gpt.safetensors (flow.safetensors with prior="flow")
        and clip.safetensors in `folder` (what export.py writes and pretrained/shapes/ ships).
        CheckpointError names a missing file, or says the three do not fit together."""
        if prior not in cls.PRIORS:
            raise ValueError(f"prior {prior!r} is not one of {', '.join(cls.PRIORS)}")
        folder = Path(folder)
        paths = {k: folder / f"{prior if k == 'gpt' else k}.safetensors" for k in cls.STAGES}
        for kind, path in paths.items():
            if not path.is_file():
                what = "flow prior" if path.name == "flow.safetensors" else kind.upper()
                raise CheckpointError(f"{folder} has no {path.name} (the {what} weights); write it with "
                                      f"export.py, or run `make shapes` for pretrained/shapes/")
        try:
            return cls.from_paths(str(paths["vqgan"]), str(paths["gpt"]), str(paths["clip"]), device, precision,
                                  use_ema)
        except CheckpointError:
            raise
        except ValueError as e:  # the stages' sizes do not match
            raise CheckpointError(f"the weights in {folder} do not belong together: {e}") from None

    @classmethod
    def from_paths(cls, vqgan: str, gpt: str, clip: str, device=None, precision: str = "auto",
                   use_ema: bool = True) -> "TextToImage":
        dev = torch.device(device) if device else D.pick_device(None)
        return cls(load_vqgan(vqgan), load_prior(gpt, use_ema=use_ema), load_clip(clip, device=dev), dev, precision)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self._amp or torch.float32, enabled=self._amp is not None)

    @torch.no_grad()
    def sample_conds(self, conds: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, cfg_scale: float = 1.0, seed: int = 0,
                     batch_size: int = 64,
                     progress: Callable[[float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One image per row of conds (B, D) -> (images (B, 3, H, W) in [-1, 1], tokens (B, h, w)); rows are
        sampled batch_size at a time from one seeded generator. `progress(rows_done)` is called as tokens
        are drawn (fractions of rows: a row is done when all its tokens are). GuidanceError (before any
        work) when cfg_scale != 1 and the GPT's null condition was never trained."""
        self.gpt.cfg.check_guidance(cfg_scale)
        g = torch.Generator(device=self.device).manual_seed(seed)
        side = self.vqgan.cfg.grid_size
        conds = conds.float().to(self.device)
        images, tokens = [], []
        for start in range(0, len(conds), batch_size):
            c = conds[start:start + batch_size]
            with self._autocast(), _token_progress(self.gpt, progress, start, len(c)):
                extra = {"parallel": self.parallel, "window": self.window} if self.parallel else {}
                if self.step != "eager" and not isinstance(self.gpt, FlowPrior):
                    extra["step"] = self.step
                t = self.gpt.sample(c.to(self._gpt_dtype), temperature=temperature, top_k=top_k, top_p=top_p,
                                    cfg_scale=cfg_scale, generator=g, **extra)
                x = self.vqgan.decode_indices(t.view(len(c), side, side))
            images.append(x.float().clamp(-1, 1))
            tokens.append(t.view(len(c), side, side))
            if progress is not None:
                progress(float(start + len(c)))
        return torch.cat(images), torch.cat(tokens)

    def sample(self, cond: torch.Tensor, n: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """n candidates for one condition (D,) -> (images (n, 3, H, W), tokens (n, h, w))."""
        return self.sample_conds(cond.float().view(1, -1).expand(n, -1), **kw)

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, n_candidates: int = 16, keep: int | None = None,
                 rerank: bool = True, refine: RefineConfig | None = None, **sample_kw) -> Generation:
        """Sample n_candidates for the condition (D,), score each by CLIP similarity to it, keep the best.
        With refine (steps > 0) the kept candidates are then refined toward the condition (models/refine.py,
        seeded by sample_kw's seed) and re-ranked by their new scores."""
        cond = cond.float().view(-1)
        images, tokens = self.sample(cond, n_candidates, **sample_kw)
        scores = self.clip.encode_image(images) @ cond.to(self.device)
        keep = keep or n_candidates
        order = scores.argsort(descending=True) if rerank else torch.arange(len(scores), device=scores.device)
        order = order[:keep]
        images, scores, tokens = images[order], scores[order], tokens[order]
        if refine is not None and refine.steps > 0:
            tokens = self.refine(tokens, cond, refine, seed=sample_kw.get("seed", 0))
            images = self.decode(tokens)
            scores = self.clip.encode_image(images) @ cond.to(self.device)
            if rerank:
                order = scores.argsort(descending=True)
                images, scores, tokens = images[order], scores[order], tokens[order]
        return Generation(images, scores, tokens)

    def refine(self, tokens: torch.Tensor, cond: torch.Tensor, cfg: RefineConfig, seed: int = 0,
               batch_size: int = 64, scores_out: list | None = None) -> torch.Tensor:
        """Token grids (B, h, w) moved toward cond ((D,) or (B, D)) by CLIP's gradient, each step weighed by
        the GPT's likelihood of the grid under the same condition (models/refine.py); batch_size grids at a
        time, one seeded generator per batch. Steps 0: the grids as they are."""
        cfg.check()
        if cfg.steps == 0:
            return tokens
        cond = cond.float().to(self.device)
        cond = cond.view(1, -1).expand(len(tokens), -1) if cond.dim() == 1 else cond
        with _threads(self.refine_threads if self.device.type == "cpu" else None):
            return self._refine(tokens, cond, cfg, seed, batch_size, scores_out)

    def _refine(self, tokens, cond, cfg, seed, batch_size, scores_out) -> torch.Tensor:
        out = []
        for start in range(0, len(tokens), batch_size):
            c = cond[start:start + batch_size]

            def prior(grids: torch.Tensor, c=c) -> torch.Tensor:  # (b, h, w) -> (b,) mean log-likelihood
                return self.gpt.log_prob(grids.flatten(1), c)

            if not hasattr(self.gpt, "log_prob"):  # the flow prior gives no likelihood: CLIP's score alone
                prior = None

            out.append(refine_tokens(self.vqgan, self.clip, tokens[start:start + batch_size].to(self.device), c,
                                     cfg, seed=seed + start, scores_out=scores_out, prior=prior))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grids (B, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        with self._autocast():
            return self.vqgan.decode_indices(tokens.to(self.device)).float().clamp(-1, 1)

    def __call__(self, prompt: str, n_candidates: int = 16, keep: int | None = None, **kw) -> Generation:
        return self.generate(self.clip.encode_text([prompt])[0], n_candidates, keep, **kw)

    # ------------------------------------------------------------------------------ other conditions

    def image_condition(self, picture) -> torch.Tensor:
        """The CLIP image embedding (D,) of a picture (a path or a PIL image), seen as the VQGAN sees its
        training images: RGB (transparency over white), centre-cropped square, resized to its resolution."""
        x = load_picture(picture, self.vqgan.cfg.resolution)
        return self.clip.encode_image(x.to(self.device))[0]

    def variations(self, picture, n_candidates: int = 16, keep: int | None = None, **kw) -> Generation:
        """Images like `picture`: its CLIP image embedding as the condition (scores: similarity to it)."""
        return self.generate(self.image_condition(picture), n_candidates, keep, **kw)

    @torch.no_grad()
    def interpolate(self, a: str | torch.Tensor, b: str | torch.Tensor, steps: int = 8, mode: str = "slerp",
                    seed: int = 0, progress: Callable[[float], None] | None = None, **sample_kw) -> Generation:
        """One image per step from condition a to condition b (texts or (D,) embeddings), each step drawn
        with the same seed so only the condition changes; in step order, scores: similarity to each
        step's own condition. mode: slerp (great circle) or lerp (normalised straight line)."""
        if steps < 2:
            raise ValueError("an interpolation needs at least 2 steps")
        a, b = (self.clip.encode_text([x])[0] if isinstance(x, str) else x.float().view(-1).to(self.device)
                for x in (a, b))
        conds = torch.stack([blend(a, b, i / (steps - 1), mode) for i in range(steps)])
        images, tokens = [], []
        for i, c in enumerate(conds):
            step_progress = None if progress is None else (lambda done, i=i: progress(i + done))
            x, t = self.sample_conds(c.view(1, -1), seed=seed, progress=step_progress, **sample_kw)
            images.append(x)
            tokens.append(t)
        images = torch.cat(images)
        scores = (self.clip.encode_image(images) * conds).sum(-1)
        return Generation(images, scores, torch.cat(tokens))


@contextmanager
def _threads(n: int | None):
    """torch's CPU threads set to n for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


BF16_WEIGHTS_MIN_PARAMS = 10_000_000  # precision "auto" on a CPU: bf16 GPT weights from this size on


def bf16_weights_pay(gpt) -> bool:
    """Whether precision "auto" stores a GPT's weights in bf16 on the CPU: where oneDNN packs bf16 weights
    (AVX512-BF16 or AMX; models.packed.supported) and the GPT is large enough that reading its weights
    bounds a decode step (BF16_WEIGHTS_MIN_PARAMS). Measured on a 2-core Xeon with AVX512-BF16 and no AMX
    (bench/sampling.py): the 8 x 512 GPT (42M) samples 1.31x faster than with fp32 weights; the shipped
    Shapes GPT (3.5M) stays fp32, as its demo and evaluation gain next to nothing (README, "demo.py speed")
    and keep drawing the tokens the README's numbers were measured with. Never the flow prior."""
    return isinstance(gpt, GPT) and packed.supported(torch.bfloat16) and \
        sum(p.numel() for p in gpt.parameters()) >= BF16_WEIGHTS_MIN_PARAMS


@contextmanager
def _token_progress(gpt: GPT | FlowPrior, report: Callable[[float], None] | None, start: int, rows: int):
    """While a batch of `rows` (rows start.. of the whole) is sampled, report start + rows * (tokens drawn /
    tokens) after each GPT step: one forward per token, seen through a forward hook (for the flow prior,
    network evaluations done / its n_forwards; under speculative Jacobi decoding, which verifies several
    tokens a forward, the tokens final in every row, GPT.tokens_final)."""
    if report is None:
        yield
        return
    n, calls = max(1, getattr(gpt, "n_forwards", gpt.cfg.n_tokens)), [0]

    def hook(*_):
        calls[0] += 1
        final = getattr(gpt, "tokens_final", None)
        report(start + rows * (final / gpt.cfg.n_tokens if final is not None else min(calls[0], n) / n))

    handle = gpt.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def blend(a: torch.Tensor, b: torch.Tensor, t: float, mode: str = "slerp") -> torch.Tensor:
    """The unit vector a fraction t of the way from a to b (both (D,), normalised here): slerp follows the
    great circle at constant speed, lerp the straight line, renormalised."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    if mode == "lerp":
        return F.normalize(torch.lerp(a, b, t), dim=-1)
    if mode != "slerp":
        raise ValueError(f"unknown interpolation mode {mode!r}; choose slerp or lerp")
    omega = math.acos(max(-1.0, min(1.0, float(a @ b))))
    if omega < 1e-4:  # (nearly) the same direction: the straight line is the arc
        return F.normalize(torch.lerp(a, b, t), dim=-1)
    return F.normalize((math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega), dim=-1)


# ------------------------------------------------------------------------------------------ pictures

def load_picture(picture, size: int) -> torch.Tensor:
    """A path or PIL image -> (1, 3, size, size) in [-1, 1]: decoded as a viewer shows it (EXIF orientation,
    16-bit and float pixels by their range, transparent parts over white: engine.images.decode_rgb), the
    centred square crop, resized with bicubic filtering. OSError (PIL's UnidentifiedImageError is one)
    when the file cannot be read as a picture."""
    from PIL import Image

    img = decode_rgb(picture)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.tensor(np.asarray(img))  # (size, size, 3) uint8
    return (x.permute(2, 0, 1).float() / 127.5 - 1).unsqueeze(0)


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) (or one (3, H, W)) in [-1, 1] -> list of 8-bit RGB PIL images."""
    from PIL import Image

    x = images.detach().float().cpu()
    x = x.unsqueeze(0) if x.dim() == 3 else x
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(a) for a in x]


def image_grid(images: torch.Tensor, ncol: int | None = None, padding: int = 2,
               pad_value: float = 1.0) -> torch.Tensor:
    """(B, 3, H, W) -> one (3, H', W') image: rows of ncol (default min(B, 8)) images, `padding` pixels of
    pad_value (white) around and between them."""
    b, c, h, w = images.shape
    ncol = max(1, min(ncol or min(b, 8), b))
    nrow = math.ceil(b / ncol)
    out = images.new_full((c, nrow * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i, x in enumerate(images):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        out[:, top:top + h, left:left + w] = x
    return out


def numbered(path: str | os.PathLike, i: int | str) -> Path:
    """sample.png, 3 -> sample_3.png (beside it)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{i}{path.suffix}")


def save_images(images: torch.Tensor, path: str | os.PathLike, ncol: int | None = None, padding: int = 2,
                individual: bool = True) -> list[Path]:
    """(B, 3, H, W) in [-1, 1] -> the grid at `path` (see image_grid; the format from its suffix) and, if
    `individual`, image i at <stem>_<i><suffix> beside it. Returns [grid, image 0, image 1, ...]."""
    path = Path(path)
    grid = image_grid(images.detach().float().cpu(), ncol, padding)
    out = [path]
    _save_atomic(to_pil(grid)[0], path)
    if individual:
        for i, img in enumerate(to_pil(images)):
            _save_atomic(img, numbered(path, i))
            out.append(numbered(path, i))
    return out


def _save_atomic(img, path: Path) -> None:
    """PIL image -> path through a temporary file and a rename (engine.checkpoint.atomic_write): a full disk
    or a crash leaves the previous picture whole, never a truncated one in its place."""
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image format {path.suffix!r}")
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt))
