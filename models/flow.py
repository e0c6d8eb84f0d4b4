"""A second stage-2 prior: conditional flow matching (rectified flow) over the VQGAN's latent grid.

The GPT draws a token grid one token at a time; this prior draws the whole grid at once by integrating an
ODE. Its space is the VQGAN's *quantised* latent: the code vector of every token of a grid (the codebook
rows, times `latent_scale` so each dimension has about unit variance), so training needs nothing but the
token shards the GPT already trains on. clip2latent (a diffusion prior on StyleGAN's latent conditioned on
CLIP image embeddings) and Net2Net (a conditional flow between two experts' representations) are the same
idea in other generators' latents.

Training (rectified flow, Liu et al. 2022; flow matching, Lipman et al. 2022): x1 the scaled code vectors
(B, T, d), x0 ~ N(0, I), t in [0, 1], x_t = (1 - t) x0 + t x1; the network predicts the velocity x1 - x0
from (x_t, t, condition) with a mean-squared error. Condition dropout trains a learned null condition for
classifier-free guidance, as the GPT's: v = v_null + s (v_cond - v_null).

Sampling: x0 ~ N(0, temperature² I), `steps` Euler or Heun steps from t = 0 to 1, then every vector snapped
to its nearest code with the VQGAN quantiser's own rule (cosine for l2-normalised codes), so the result
is a token grid like the GPT's and the VQGAN decodes it. Zero steps snap the noise itself.

The network is a small DiT (Peebles & Xie 2023): a transformer over the grid's positions (no causal
mask) whose blocks are modulated by adaLN-Zero from the sum of a timestep embedding and the projected
CLIP embedding. `FlowPrior.sample` has the GPT's signature, so models.pipeline.TextToImage, demo.py and
evaluate.py sample either prior unchanged; `load_prior` reads either kind of file.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import CheckpointError
from engine.errors import UsageError
from models.dropout import Dropout, attention
from models.gpt import ORIGINS, GuidanceError, check_decoding

SOLVERS = ("euler", "heun")
# What the network predicts: the velocity x1 - x0 (trained by its squared error), or the tokens of x1
# (logits over the codes, trained by cross-entropy; the velocity is (E[x1] - x_t) / (1 - t) with E[x1] the
# codes' vectors weighed by their probabilities: CDCD's "score interpolation", Dieleman et al. 2022).
OBJECTIVES = ("velocity", "tokens")


@dataclass(frozen=True)
class FlowConfig:
    vocab_size: int = 512           # VQGAN codebook size
    n_tokens: int = 64              # grid positions (VQGAN grid side squared)
    latent_dim: int = 16            # code vector width (the VQGAN's embed_dim)
    cond_dim: int = 512             # CLIP embedding width
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 256
    patch: int = 2                  # grid positions per side the network reads as one (2: 2x2 -> 1 vector)
    dropout: float = 0.0
    l2_codes: bool = True           # the VQGAN's quantiser compares normalised vectors (cosine)
    latent_scale: float = 1.0       # code vectors are multiplied by this (unit variance per dimension)
    steps: int = 8                  # default ODE steps when sampling
    solver: str = "euler"           # default ODE solver, one of SOLVERS
    objective: str = "velocity"     # one of OBJECTIVES
    null_cond_trained: bool = True  # as GPTConfig: guidance is refused when the null condition is untrained
    origin: str = "project"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        side = math.isqrt(self.n_tokens)
        if side * side != self.n_tokens or side % self.patch:
            raise ValueError(f"{self.n_tokens} tokens are not a square grid whose side divides by patch {self.patch}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver {self.solver!r} is not one of {', '.join(SOLVERS)}")
        if self.steps < 0:
            raise ValueError(f"steps must be 0 or more, not {self.steps}")
        if self.origin not in ORIGINS:
            raise ValueError(f"origin {self.origin!r} is not one of {', '.join(ORIGINS)}")

    def check_guidance(self, cfg_scale: float) -> None:
        if cfg_scale != 1.0 and not self.null_cond_trained:
            raise GuidanceError(f"classifier-free guidance (cfg scale {cfg_scale:g}) needs a trained null "
                                "condition and this flow prior was trained with --cond-drop 0; sample with "
                                "cfg scale 1, or fine-tune it with --cond-drop > 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def side(self) -> int:
        return math.isqrt(self.n_tokens)

    @property
    def n_positions(self) -> int:
        return self.n_tokens // (self.patch * self.patch)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# vocab_size, n_tokens, latent_dim, cond_dim, l2_codes and latent_scale come from the VQGAN and CLIP.
FLOW_PRESETS: dict[str, FlowConfig] = {
    "tiny": FlowConfig(n_layer=4, n_head=8, n_embd=256),
    "small": FlowConfig(n_layer=8, n_head=8, n_embd=512),
}


def build_flow(preset: str, codebook: torch.Tensor, *, n_tokens: int, cond_dim: int, l2_codes: bool,
               **overrides) -> "FlowPrior":
    """A fresh prior over the grids of a VQGAN whose (normalised, if l2_codes) codebook is `codebook` (K, d)."""
    codebook = codebook.detach().float().cpu()
    scale = 1.0 / max(float(codebook.std()), 1e-6)  # about unit variance per dimension
    cfg = replace(FLOW_PRESETS[preset], vocab_size=codebook.shape[0], n_tokens=n_tokens,
                  latent_dim=codebook.shape[1], cond_dim=cond_dim, l2_codes=l2_codes,
                  latent_scale=round(scale, 6), **overrides)
    model = FlowPrior(cfg)
    model.codebook.copy_(codebook)
    return model


def vqgan_codebook(vqgan) -> torch.Tensor:
    """The codes a VQGAN decodes (K, d): normalised when its quantiser compares normalised vectors."""
    return vqgan.quantize.codebook().detach().float()


# ---------------------------------------------------------------------------------------------- network

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t (B,) in [0, 1] -> (B, dim) sinusoids of 1000 t (DiT/ADM's embedding of the step index)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        y = attention(q, k, v, is_causal=False, p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """adaLN-single (PixArt-alpha): LayerNorms without their own affine, shifted, scaled and gated per sample
    by one modulation of the condition shared by every block, plus this block's own learned offsets (zero
    at the start, so that with the zero-initialised shared modulation every block starts as the identity:
    DiT's adaLN-Zero at a sixth of its parameters)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        C = cfg.n_embd
        self.ln_1 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(approximate="tanh"), Dropout(cfg.dropout),
                                 nn.Linear(4 * C, C))
        self.mod = nn.Parameter(torch.zeros(6, C))

    def forward(self, x, m):  # x (B, T, C), m (B, 6, C): the shared modulation
        s1, g1, b1, s2, g2, b2 = (m + self.mod.to(m.dtype))[:, :, None].unbind(1)   # each (B, 1, C)
        x = x + g1 * self.attn(self.ln_1(x) * (1 + s1) + b1)
        return x + g2 * self.mlp(self.ln_2(x) * (1 + s2) + b2)


class FlowPrior(nn.Module):
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        # The codes the grid's tokens stand for (K, d): what training targets and sampling snaps to.
        self.register_buffer("codebook", torch.zeros(cfg.vocab_size, cfg.latent_dim))
        width = cfg.latent_dim * cfg.patch * cfg.patch
        self.inp = nn.Linear(width, C)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.n_positions, C))
        self.t_mlp = nn.Sequential(nn.Linear(256, C), nn.SiLU(), nn.Linear(C, C))
        self.cond_proj = nn.Linear(cfg.cond_dim, C)
        self.null_cond = nn.Parameter(torch.zeros(C))  # the guidance "unconditional" input, learned
        self.drop = Dropout(cfg.dropout)
        self.ada = nn.Linear(C, 6 * C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.ada_f = nn.Linear(C, 2 * C)
        self.out = nn.Linear(C, width if cfg.objective == "velocity" else cfg.patch * cfg.patch * cfg.vocab_size)
        self._init_weights()
        # Sampling settings TextToImage's calls use (GPT.sample's signature has no place for them).
        self.steps, self.solver = cfg.steps, cfg.solver

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_proj.weight, std=0.02)
        for m in self.t_mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in (self.ada, self.ada_f, self.out):  # zero modulation and output: every block starts as identity
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------------------------------- latents

    def latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grids (B, T) (or (B, h, w)) -> the scaled code vectors (B, T, d) the flow ends at."""
        return self.codebook[tokens.flatten(1)] * self.cfg.latent_scale

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors (B, T, d) in the scaled space -> the nearest codes' indices (B, T), by the VQGAN
        quantiser's rule (normalised first when its codes are)."""
        z = x.float() / self.cfg.latent_scale
        if self.cfg.l2_codes:
            z = F.normalize(z, dim=-1)
        cb = self.codebook.float()
        d = z.pow(2).sum(-1, keepdim=True) + cb.pow(2).sum(-1) - 2 * z @ cb.t()   # (B, T, K)
        return d.argmin(-1)

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        """The network's prediction at x (B, T, d), times t (B,) in [0, 1], conditions cond (B, cond_dim) (the
        null condition in the rows where cond_drop (B,) is True): the velocity (B, T, d), or for the tokens
        objective logits over the codes (B, T, vocab) (to_velocity turns either into a velocity). Computes in
        the weights' dtype, returns float."""
        dtype = self.inp.weight.dtype
        c = self.cond_proj(cond.to(dtype))
        if cond_drop is not None:
            c = torch.where(cond_drop[:, None], self.null_cond.to(c.dtype), c)
        c = c + self.t_mlp(timestep_embedding(t, 256).to(dtype))
        h = self.drop(self.inp(self.patchify(x.to(dtype))) + self.pos_emb)
        m = self.ada(F.silu(c)).view(-1, 6, self.cfg.n_embd)
        for block in self.blocks:
            h = block(h, m)
        shift, scale = self.ada_f(F.silu(c))[:, None].chunk(2, dim=-1)
        return self.unpatchify(self.out(self.ln_f(h) * (1 + scale) + shift)).float()

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) in raster order -> (B, T / p², p² d): each p x p square of the grid as one vector."""
        p, s, B = self.cfg.patch, self.cfg.side, x.shape[0]
        if p == 1:
            return x
        x = x.reshape(B, s // p, p, s // p, p, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, (s // p) ** 2, -1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of patchify: (B, T / p², p² d) -> (B, T, d)."""
        p, s, B = self.cfg.patch, self.cfg.side, x.shape[0]
        if p == 1:
            return x
        x = x.reshape(B, s // p, s // p, p, p, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, s * s, -1)

    def to_velocity(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity (B, T, d) at x and times t (B,) from the network's output (see forward)."""
        if self.cfg.objective == "velocity":
            return out
        x1 = F.softmax(out.float(), dim=-1) @ (self.codebook.float() * self.cfg.latent_scale)   # E[x1 | x_t]
        return (x1 - x) / (1 - t.float()[:, None, None]).clamp_min(1e-4)

    def objective_loss(self, out: torch.Tensor, tokens: torch.Tensor, x1: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """The training loss of the network's output for grids `tokens` (B, T) (x1 their scaled codes): the
        velocity's squared error, or the tokens' cross-entropy."""
        if self.cfg.objective == "velocity":
            return F.mse_loss(out.float(), x1 - noise)
        return F.cross_entropy(out.float().flatten(0, 1), tokens.flatten())

    def estimate(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The tokens (B, T) the output predicts at x and t in one step: the snapped end point x + (1 - t) v,
        or the most likely codes."""
        if self.cfg.objective == "tokens":
            return out.argmax(-1)
        return self.snap(x + (1 - t.float()[:, None, None]) * out)

    # --------------------------------------------------------------------------------------- sampling

    @property
    def n_forwards(self) -> int:
        """Network evaluations per sample with the current settings (with guidance each is on 2 rows)."""
        if self.solver == "euler" or self.steps == 0:
            return self.steps
        # Heun's correction at t = 1 would divide by 1 - t for the tokens objective: its last step is Euler's.
        return 2 * self.steps - (self.cfg.objective == "tokens")

    def guided(self, x, t: float, cond, cfg_scale: float) -> torch.Tensor:
        """The network's output at x and time t, guided: null + cfg_scale * (cond - null), one batch of 2B
        rows (B rows and no null when cfg_scale is 1). For the tokens objective the logits are guided."""
        B = x.shape[0]
        tt = torch.full((B,), t, device=x.device)
        if cfg_scale == 1.0:
            return self(x, tt, cond)
        drop = torch.arange(2 * B, device=x.device) >= B
        out = self(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, cond]), drop)
        c, u = out.chunk(2)
        return u + cfg_scale * (c - u)

    def velocity(self, x, t: float, cond, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the guided velocity at x and time t, the guided network output it came from)."""
        out = self.guided(x, t, cond, cfg_scale)
        return self.to_velocity(out, x, torch.full((x.shape[0],), t, device=x.device)), out

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
               n_tokens: int | None = None, first_tokens: torch.Tensor | None = None, steps: int | None = None,
               solver: str | None = None) -> torch.Tensor:
        """cond (B, cond_dim) -> tokens (B, n_tokens): noise of std `temperature`, `steps` ODE steps (default
        self.steps) with `solver` (default self.solver), guidance null + cfg_scale * (cond - null), then the
        nearest codes. GPT.sample's signature; top-k, top-p and first tokens belong to token-by-token
        sampling and are refused (ValueError)."""
        self.cfg.check_guidance(cfg_scale)
        steps = self.steps if steps is None else steps
        solver = solver or self.solver
        if top_k is not None or top_p is not None:
            raise ValueError("top-k and top-p filter a token distribution; the flow prior draws whole grids "
                             "and has none (leave them unset)")
        if first_tokens is not None or (n_tokens is not None and n_tokens != self.cfg.n_tokens):
            raise ValueError("the flow prior draws whole grids: no first tokens, no other length")
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if solver not in SOLVERS:
            raise ValueError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
        if steps < 0:
            raise ValueError(f"steps must be 0 or more, not {steps}")
        B, device = cond.shape[0], cond.device
        x = torch.randn(B, self.cfg.n_tokens, self.cfg.latent_dim, generator=generator, device=device,
                        dtype=torch.float32) * temperature
        was_training = self.training
        self.eval()
        try:
            tokens_objective = self.cfg.objective == "tokens"
            for i in range(steps):
                t0, t1 = i / steps, (i + 1) / steps
                v, last = self.velocity(x, t0, cond, cfg_scale)
                if solver == "heun" and not (tokens_objective and i == steps - 1):
                    v = 0.5 * (v + self.velocity(x + (t1 - t0) * v, t1, cond, cfg_scale)[0])
                x = x + (t1 - t0) * v
        finally:
            self.train(was_training)
        if tokens_objective and steps > 0:  # the most likely codes of the last step's (guided) prediction
            return last.argmax(-1)
        return self.snap(x)

    # -------------------------------------------------------------------------------------- optimiser

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay the Linear weights only, as the GPT."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = list(self.parameters())
        return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------ loading

def flow_config(obj: dict) -> FlowConfig:
    try:
        return FlowConfig.from_dict(dict(obj["config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad 'config' entry ({e})") from None


def flow_from_checkpoint(obj: dict, path, use_ema: bool = True) -> FlowPrior:
    from models.convert import strict_load

    try:
        if not isinstance(obj.get("config"), dict) or not isinstance(obj.get("model"), dict):
            raise CheckpointError("a flow checkpoint without 'config' and 'model' entries; it is incomplete")
        cfg = flow_config(obj)
        sd = obj["ema"] if use_ema and isinstance(obj.get("ema"), dict) else obj["model"]
        model = strict_load(FlowPrior(cfg), sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.eval()


def load_flow(path: str | os.PathLike, map_location="cpu", use_ema: bool = True) -> FlowPrior:
    """A flow prior in eval mode from a `train_gpt.py --model flow` checkpoint or its exported weights."""
    model = load_prior(path, map_location, use_ema)
    if not isinstance(model, FlowPrior):
        raise CheckpointError(f"{path} is a GPT, not a flow prior (kind 'flow', from train_gpt.py --model flow)")
    return model


def load_prior(path: str | os.PathLike, map_location="cpu", use_ema: bool = True):
    """The stage-2 prior in a file, whichever it is: a FlowPrior for kind 'flow', else a GPT (ours or
    CLIP-GEN's, models.convert_gpt.load_gpt). One read of the file either way."""
    from models.convert import read_checkpoint
    from models.convert_gpt import load_gpt

    path = Path(path)
    obj = read_checkpoint(path, map_location, what="GPT or flow prior")
    if isinstance(obj, dict) and obj.get("kind") == "flow":
        model = flow_from_checkpoint(obj, path, use_ema)
        return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
    return load_gpt(path, map_location, use_ema, obj=obj)


def check_codebook(prior, vqgan) -> None:
    """ValueError unless a flow prior's codes are the VQGAN's (fp16 storage tolerated): a prior trained on
    another VQGAN's codes would snap to the wrong tokens without any other sign. No-op for a GPT."""
    if not isinstance(prior, FlowPrior):
        return
    mine, theirs = prior.codebook.float().cpu(), vqgan_codebook(vqgan).cpu()
    if mine.shape != theirs.shape or not torch.allclose(mine, theirs, atol=2e-3, rtol=2e-3):
        raise ValueError("the flow prior was trained on another VQGAN's codes (its codebook differs from "
                         "--vqgan's); pass the VQGAN it was trained with")


# ------------------------------------------------------------------------------ command-line settings

def add_flow_args(parser):
    """--flow-steps and --flow-solver (demo.py, evaluate.py): how a flow prior samples."""
    from engine.cli import at_least

    g = parser.add_argument_group("flow prior (a --gpt file of kind flow, or demo.py --prior flow)")
    g.add_argument("--flow-steps", type=at_least(0), default=None,
                   help="ODE steps (default: the number it was trained to sample with)")
    g.add_argument("--flow-solver", choices=list(SOLVERS), default=None,
                   help="ODE solver (default: its own; heun costs two network calls a step)")
    return g


def add_parallel_args(parser):
    """--parallel, --sjd-window and --zipar-window (demo.py, evaluate.py): how a GPT decodes."""
    from engine.cli import at_least

    g = parser.add_argument_group("GPT decoding")
    g.add_argument("--parallel", choices=["sjd", "zipar"], default=None,
                   help="sjd: speculative Jacobi decoding, several tokens per forward, the same distribution; "
                        "zipar: row-parallel decoding, a row starts once the row above has --zipar-window "
                        "tokens, fewer forwards still, an approximation (default: one token per forward)")
    g.add_argument("--sjd-window", type=at_least(1), default=8, help="draft tokens verified per forward (sjd)")
    g.add_argument("--zipar-window", type=at_least(1), default=None,
                   help="tokens of a row drawn before the row below starts (zipar; default: half a row)")
    g.add_argument("--decode-step", choices=["eager", "static", "cuda-graph"], default="eager",
                   help="how one-token steps run: eager; static (fixed-shape KV cache); cuda-graph (the static "
                        "step captured once and replayed, CUDA only); the same tokens for a seed")
    return g


def apply_parallel_args(pipe, args) -> None:
    """args.parallel/sjd_window/zipar_window/decode_step onto a TextToImage; UsageError for what cannot be combined."""
    parallel, step = getattr(args, "parallel", None), getattr(args, "decode_step", "eager")
    if parallel is None and step == "eager":
        return
    if isinstance(pipe.gpt, FlowPrior):
        raise UsageError(f"--{'parallel' if parallel else 'decode-step'} is for a GPT's token decoding; "
                         "the flow prior draws whole grids")
    try:
        check_decoding(parallel, step, pipe.device)          # before any sampling, with GPT.sample's words
    except ValueError as e:
        raise UsageError(f"--parallel / --decode-step: {e}") from None
    window = args.sjd_window if parallel != "zipar" else getattr(args, "zipar_window", None)
    pipe.parallel, pipe.window, pipe.step = parallel, window, step


def apply_flow_args(prior, args) -> str | None:
    """args.flow_steps/flow_solver onto a flow prior (its `steps`, `solver`); UsageError (one line) for them
    on a GPT, and for a top-k or top-p on a flow prior (it has no token distribution to filter). Returns a
    line saying how the flow prior samples, None for a GPT."""
    if not isinstance(prior, FlowPrior):
        for flag in ("flow_steps", "flow_solver"):
            if getattr(args, flag, None) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is for the flow prior; this prior is a GPT")
        return None
    for flag in ("top_k", "top_p"):
        if getattr(args, flag, None) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} filters a GPT's token distribution; the flow prior "
                             "draws whole grids and has none")
    if args.flow_steps is not None:
        prior.steps = args.flow_steps
    if args.flow_solver is not None:
        prior.solver = args.flow_solver
    return f"prior: flow, {prior.steps} {prior.solver} steps ({prior.n_forwards} network calls per candidate)"


def describe(prior) -> dict:
    """What a results file records about the prior that sampled."""
    if isinstance(prior, FlowPrior):
        return {"kind": "flow", "steps": prior.steps, "solver": prior.solver, "n_forwards": prior.n_forwards}
    return {"kind": "gpt", "n_forwards": prior.cfg.n_tokens}


__all__ = ["add_flow_args", "add_parallel_args", "apply_flow_args", "apply_parallel_args", "describe", "FlowConfig", "FLOW_PRESETS", "FlowPrior", "SOLVERS", "build_flow", "check_codebook", "load_flow",
           "load_prior", "timestep_embedding", "vqgan_codebook"]
