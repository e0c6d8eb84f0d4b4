"""The stage-2 GPT: p(image tokens | CLIP embedding), a decoder-only transformer as in CLIP-GEN.

The CLIP embedding is projected to `n_prefix` prefix token(s) (CLIP-GEN: one) placed before the image
tokens; a learned absolute position embedding is added to the whole sequence; pre-norm blocks (LayerNorm ->
causal self-attention -> residual, LayerNorm -> 4x MLP with exact GELU -> residual); final LayerNorm; a
Linear head with bias. This is what CLIP-GEN's ``nn.TransformerEncoderLayer(norm_first=True)`` stack
computes, so its checkpoints load after renaming (``models/convert_gpt.py``).

Training convention: ``logits = gpt(tokens, cond)`` has the shape of ``tokens`` plus a vocabulary axis and
``logits[:, i]`` predicts ``tokens[:, i]`` from the condition and ``tokens[:, :i]``; the loss is plainly
``cross_entropy(logits.flatten(0, 1), tokens.flatten())``. Internally the model reads the prefix and
``tokens[:, :-1]`` (the last token is a target only), exactly CLIP-GEN's "feed L-1, score L".

Classifier-free guidance: a learned null prefix replaces the projected condition in the rows where
``cond_drop`` is True; the trainer drops conditions at random, the sampler mixes conditional and null logits.
A GPT whose null prefix was never trained (CLIP-GEN's, or one trained with ``--cond-drop 0``) says so in its
config (``null_cond_trained``), and sampling it with ``cfg_scale != 1`` raises GuidanceError.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import CheckpointError
from models.dropout import Dropout, attention
from models.packed import Linear, pack_linears

ORIGINS = ("project", "clipgen")  # who trained the weights: train_gpt.py, or CLIP-GEN (models/convert_gpt.py)


class GuidanceError(CheckpointError):
    """Guidance (cfg_scale != 1) asked of a GPT whose null condition was never trained; one line."""


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 1024          # VQGAN codebook size
    n_tokens: int = 64              # image tokens per image (VQGAN grid side squared)
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 256
    cond_dim: int = 512             # CLIP embedding width
    n_prefix: int = 1               # prefix tokens the projected condition becomes (CLIP-GEN: 1)
    # 0: the condition becomes the prefix by one linear map (CLIP-GEN). > 0: first through an MLP this wide
    # (two GELU layers): what a CLIP embedding says of a scene's objects is readable by an MLP but not by a
    # linear map (evaluation/scenes_probe.py), and a small GPT decodes it poorly on its own.
    cond_hidden: int = 0
    dropout: float = 0.0
    # Positions of the learned position embedding. None: n_prefix + n_tokens - 1, all a full sequence
    # needs (the last token is never fed). CLIP-GEN files may store more (its small fixture: 17 for 16).
    block_size: int | None = None
    # Provenance, not architecture. Whether null_prefix was trained (condition dropout > 0): guidance with
    # an untrained, random null prefix is silently wrong, so sample() refuses cfg_scale != 1 when False.
    # Configs written before the field existed load as True unless their run recorded cond_drop 0
    # (models.convert_gpt.project_config).
    null_cond_trained: bool = True
    origin: str = "project"         # one of ORIGINS; "clipgen" makes demo.py use CLIP-GEN's sampling settings

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.block_size is not None and self.block_size < self.min_positions:
            raise ValueError(f"block_size {self.block_size} < n_prefix + n_tokens - 1 = {self.min_positions}")
        if self.origin not in ORIGINS:
            raise ValueError(f"origin {self.origin!r} is not one of {', '.join(ORIGINS)}")

    def check_guidance(self, cfg_scale: float) -> None:
        """Raise GuidanceError (one line) if cfg_scale asks for guidance this model cannot give."""
        if cfg_scale != 1.0 and not self.null_cond_trained:
            why = "CLIP-GEN trains none" if self.origin == "clipgen" else "it was trained with --cond-drop 0"
            raise GuidanceError(f"classifier-free guidance (cfg scale {cfg_scale:g}) needs a trained null "
                                f"condition and this GPT has none ({why}), so its null prefix is random; "
                                f"sample with cfg scale 1 (demo.py/evaluate.py --cfg-scale 1, train_gpt.py --sample-cfg 1), "
                                f"or fine-tune it with --cond-drop > 0")

    @property
    def min_positions(self) -> int:
        return self.n_prefix + self.n_tokens - 1

    @property
    def n_positions(self) -> int:
        return self.block_size if self.block_size is not None else self.min_positions

    def to_dict(self) -> dict:
        return asdict(self)  # ints, floats, bools, strs and None only: safe under torch.load(weights_only=True)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# vocab_size, n_tokens and cond_dim come from the VQGAN and the CLIP model at build time (build_gpt).
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=8, n_embd=256, dropout=0.1),        # Shapes world, CPU-trainable
    "small": GPTConfig(n_layer=8, n_head=8, n_embd=512, dropout=0.1),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, dropout=0.1),  # CLIP-GEN's size
}


def build_gpt(preset: str = "tiny", *, vocab_size: int, n_tokens: int, cond_dim: int, **overrides) -> "GPT":
    return GPT(replace(PRESETS[preset], vocab_size=vocab_size, n_tokens=n_tokens, cond_dim=cond_dim,
                       **overrides))


# ------------------------------------------------------------------------------------------------ KV cache

class KVCache:
    """Keys and values of the positions already run, per layer, in buffers allocated once at full length.

    Each layer's K and V are (B, n_head, max_len, head_dim); a forward writes its new positions at
    ``length`` and attends over ``[:length + T]``, so decoding never concatenates. The buffers are allocated
    at the first write, in the dtype attention actually computes in (bf16 under autocast, say).
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int):
        self.shape = (batch_size, n_head, max_len, head_dim)
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # positions already stored (a Python int: slicing with it needs no host sync)

    @property
    def max_len(self) -> int:
        return self.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, hd) after the cached positions; return all of them (B, H, length+T, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(self.shape)
            self.v[layer] = v.new_empty(self.shape)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class StaticKVCache(KVCache):
    """A KVCache made static for one-token decode steps: the buffers are full length and zero beyond what is
    written, and the next position is also a tensor (`pos`). A step (``GPT.step_static``) writes its key and
    value at `pos` with index_copy_ and attends over all max_len slots with the slots after `pos` masked, so
    every step has the same shapes and the same buffer addresses: what a CUDA graph (or torch.compile's
    reduce-overhead mode) captures once and replays. Made from the cache a dynamic prefill filled."""

    def __init__(self, cache: KVCache):
        super().__init__(len(cache.k), *cache.shape)
        self.length = cache.length
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            self.k[layer], self.v[layer] = k, v
            k[:, :, self.length:].zero_()   # unwritten slots: zero, never NaN (a masked NaN still poisons)
            v[:, :, self.length:].zero_()
        device = cache.k[0].device
        self.pos = torch.tensor(self.length, device=device)
        self.slots = torch.arange(self.max_len, device=device)
        self.mask: torch.Tensor | None = None    # (1, max_len) slots a step may see; set by GPT.step_static

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, T, hd) into the T slots `pos` (a one-token step: one slot); all max_len slots back
        (the unwritten ones are masked)."""
        self.k[layer].index_copy_(2, self.pos.view(-1), k)
        self.v[layer].index_copy_(2, self.pos.view(-1), v)
        return self.k[layer], self.v[layer]


# ---------------------------------------------------------------------------------------------- the model

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        # q, k, v packed as rows [q; k; v] of one Linear: nn.MultiheadAttention's in_proj layout.
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = Dropout(cfg.dropout)

    def forward(self, x, kv_cache: KVCache | None = None, layer: int = 0):  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, H, T, hd)
                   for t in self.qkv(x).split(C, dim=2))
        start, mask, causal = 0, None, True
        if isinstance(kv_cache, StaticKVCache) and kv_cache.mask is not None:   # a static one-token step
            k, v = kv_cache.write(layer, k, v)
            mask, causal = kv_cache.mask, False
        elif kv_cache is not None:
            start = kv_cache.length
            k, v = kv_cache.update(layer, k, v)                                  # (B, H, start+T, hd)
            if start > 0:
                # SDPA's is_causal aligns the mask top-left, wrong once queries start after cached keys;
                # one new query may see everything, several need an explicit offset mask.
                causal = False
                if T > 1:
                    pos = torch.arange(start + T, device=x.device)
                    mask = pos[None, :] <= pos[start:, None]                     # (T, start+T)
        y = attention(q, k, v, attn_mask=mask, is_causal=causal, p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x):
        # Exact (erf) GELU as nn.TransformerEncoderLayer(activation="gelu"); the tanh form differs ~1e-4.
        return self.drop(self.proj(self.drop(F.gelu(self.fc(x)))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)  # eps 1e-5, nn.TransformerEncoderLayer's default
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


STEPS = ("eager", "static", "cuda-graph")  # GPT.sample(step=...): how the one-token decode steps run
PARALLEL = ("sjd", "zipar")                # GPT.sample(parallel=...): several tokens a forward


class GPT(nn.Module):
    pack_decoding = True  # sample(): prepacked oneDNN weights on the CPU (models/packed.py); off: plain F.linear
    # While sample_sjd runs: the tokens final in every row before the forward now running. A forward
    # there verifies a window, so forwards counted are not tokens drawn; progress bars read this instead.
    tokens_final: int | None = None

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.cond_hidden
        self.cond_mlp = (nn.Sequential(nn.Linear(cfg.cond_dim, H), nn.GELU(), nn.Linear(H, H), nn.GELU())
                         if H else None)
        self.cond_proj = Linear(H or cfg.cond_dim, cfg.n_prefix * cfg.n_embd)
        # The guidance "unconditional" input: learned, in the projected prefix space, so dropping a
        # condition does not depend on what a zero CLIP vector would mean.
        self.null_prefix = nn.Parameter(torch.zeros(cfg.n_prefix, cfg.n_embd))
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.n_positions, cfg.n_embd))  # CLIP-GEN's layout
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = Linear(cfg.n_embd, cfg.vocab_size)
        self._init_weights()

    def _init_weights(self):
        # GPT-2: N(0, 0.02) everywhere, residual output projections scaled down by sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth; zero biases, unit LayerNorms.
        # The condition MLP keeps PyTorch's fan-in initialisation: N(0, 0.02) would shrink the unit-norm
        # CLIP embedding ~50x per layer.
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.startswith("cond_mlp."):
                continue  # biases and LayerNorm parameters keep their defaults (0 / 1)
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("proj.weight") \
                and name.startswith("blocks.") else 0.02
            nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    # -------------------------------------------------------------------------------------------- forward

    def prefix(self, cond: torch.Tensor, cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        """cond (B, cond_dim) -> prefix tokens (B, n_prefix, C); the null prefix where cond_drop (B,)."""
        B = cond.shape[0]
        p = self.cond_proj(cond if self.cond_mlp is None else self.cond_mlp(cond)).view(B, self.cfg.n_prefix,
                                                                                          self.cfg.n_embd)
        if cond_drop is not None:
            p = torch.where(cond_drop.view(B, 1, 1), self.null_prefix.to(p.dtype), p)
        return p

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None,
                cond_drop: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits over the next image token.

        Without a cache (training): tokens (B, T), 1 <= T <= n_tokens -> logits (B, T, vocab) where
        logits[:, i] predicts tokens[:, i] from cond and tokens[:, :i]; tokens[:, -1] is not read.

        With a cache (decoding): every given token is fed and appended to the cache. The first call
        (empty cache) also feeds the prefix and returns T + 1 rows: the prediction of token 0 from the
        prefix, then one after each token; later calls need no cond and return T rows.
        """
        if kv_cache is None:
            feed, start = tokens[:, :-1], 0
        else:
            feed, start = tokens, kv_cache.length
        x = self.tok_emb(feed)                                             # (B, T_feed, C)
        if start == 0:
            x = torch.cat([self.prefix(cond, cond_drop).to(x.dtype), x], dim=1)   # (B, P + T_feed, C)
        end = start + x.shape[1]
        if end > self.pos_emb.shape[1]:
            raise ValueError(f"sequence of {end} positions exceeds the model's {self.pos_emb.shape[1]}")
        x = self.drop(x + self.pos_emb[:, start:end])
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length = end
        # Positions before the last prefix token predict nothing: skip them before the vocab-wide head.
        first = max(self.cfg.n_prefix - 1 - start, 0)
        return self.head(self.ln_f(x[:, first:]))                         # (B, T_out, vocab)

    @torch.no_grad()
    def log_prob(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, n_tokens), cond (B, cond_dim) -> (B,) mean log-likelihood per token under the model
        (one teacher-forced forward): how much a grid looks like what the prior would draw for cond."""
        logits = self(tokens, cond.to(next(self.parameters()).dtype)).float()  # (B, n_tokens, vocab)
        return F.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1).mean(1)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = self.cfg
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, max_len or cfg.n_positions,
                       cfg.n_embd // cfg.n_head)

    # ------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
               n_tokens: int | None = None, first_tokens: torch.Tensor | None = None, parallel: str | None = None,
               window: int | None = None, step: str = "eager") -> torch.Tensor:
        """cond (B, cond_dim) -> tokens (B, n_tokens), drawn one at a time with a KV cache.

        parallel="sjd": speculative Jacobi decoding (sample_sjd), `window` draft tokens verified per forward;
        the same distribution, fewer sequential forwards. parallel="zipar": row-parallel decoding
        (sample_zipar), a row starts once the row above has `window` tokens; fewer forwards still, an
        approximation of the distribution (a token does not see the row above beyond `window` - 1 columns
        to its right).

        step: how the one-token steps after the prefill run (the same tokens for a seed, any device):
        "eager" (the forward with a growing cache), "static" (``step_static``: a StaticKVCache, every step
        the same shapes and buffers) or "cuda-graph" (the static step captured once as a CUDA graph and
        replayed: no per-kernel launch cost; CUDA only).

        Per step: the last position's logits; guidance null + cfg_scale * (cond - null) from one batched
        forward of 2B rows (skipped when cfg_scale == 1); / temperature; top-k; top-p nucleus; multinomial
        with `generator`. `first_tokens` (B, k) are kept as given and continued. Runs in eval mode.
        GuidanceError when cfg_scale != 1 and the null condition was never trained (cfg.null_cond_trained).
        """
        self.cfg.check_guidance(cfg_scale)
        if temperature <= 0:
            raise ValueError("temperature must be > 0 (use top_k=1 for greedy decoding)")
        check_decoding(parallel, step, cond.device)
        if parallel is not None:
            if first_tokens is not None:
                raise ValueError(f"parallel={parallel!r} starts from the condition alone (no first_tokens)")
            window = decoding_window(parallel, window, n_tokens or self.cfg.n_tokens)
            if parallel == "zipar":
                return self.sample_zipar(cond, temperature, top_k, top_p, cfg_scale, generator, n_tokens, window)
            return self.sample_sjd(cond, temperature, top_k, top_p, cfg_scale, generator, n_tokens, window)
        n_tokens = n_tokens or self.cfg.n_tokens
        B, device = cond.shape[0], cond.device
        out = torch.empty(B, n_tokens, dtype=torch.long, device=device)
        feed = out[:, :0] if first_tokens is None else first_tokens.to(device)
        out[:, :feed.shape[1]] = feed
        guided = cfg_scale != 1.0
        cond, cond_drop = guidance_rows(cond, cfg_scale)
        # The last token is drawn, never fed: n_prefix + n_tokens - 1 positions.
        cache = self.new_kv_cache(cond.shape[0], self.cfg.n_prefix + n_tokens - 1)
        was_training = self.training
        self.eval()
        self.prepare_decoding(cond.shape[0])
        stepper = None
        try:
            for i in range(feed.shape[1], n_tokens):
                rows_in = feed.repeat(2, 1) if guided else feed
                if stepper is None:
                    logits = self(rows_in, cond, cond_drop, kv_cache=cache)[:, -1]
                    if step != "eager" and i + 1 < n_tokens:   # after the prefill: static steps from here on
                        stepper = self.static_stepper(cache, graph=step == "cuda-graph")
                else:
                    logits = stepper(rows_in)
                logits = guide(logits, cfg_scale)                          # (B, vocab)
                feed = draw(logits / temperature, top_k, top_p, generator)  # (B, 1)
                out[:, i] = feed[:, 0]
        finally:
            self.train(was_training)
        return out

    @torch.no_grad()
    def sample_sjd(self, cond: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
                   n_tokens: int | None = None, window: int = 8) -> torch.Tensor:
        """Speculative Jacobi decoding (Teng et al., ICLR 2025): every position not yet final holds a draft
        token x drawn from a draft distribution q (uniform at first). Each forward feeds the window of drafts
        after the last cached token and gives, at every position of the window, the model's distribution p
        given the tokens before it; per row, drafts are accepted left to right with probability
        min(1, p(x) / q(x)), the first rejected one is replaced by a draw from norm(max(0, p - q)) and
        becomes final, and the drafts after it are drawn again from their new p (which becomes their q).
        This is speculative sampling, so each grid is drawn from exactly the distribution one-token
        decoding draws from (with the same guidance, temperature, top-k and top-p), in fewer forwards;
        with top_k=1 it is greedy decoding. Rows accept different numbers of tokens; the KV cache keeps the
        tokens final in every row (rows ahead feed their final tokens again), and `self.last_forwards`
        counts the forwards of the last call.

        Vectorised over rows and window positions (a handful of tensor ops and one host sync per forward);
        distributions are kept on their support only (the top-k tokens: K = top_k, else the vocabulary), so
        the window's bookkeeping is (rows, window + 1, K), never (rows, n_tokens, vocab)."""
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        N = n_tokens or self.cfg.n_tokens
        B, device, V, P = cond.shape[0], cond.device, self.cfg.vocab_size, self.cfg.n_prefix
        K = min(top_k, V) if top_k is not None else V
        guided = cfg_scale != 1.0
        cond, cond_drop = guidance_rows(cond, cfg_scale)
        cache = self.new_kv_cache(cond.shape[0], P + N - 1)
        out = torch.randint(0, V, (B, N), device=device, generator=generator)    # drafts, then final tokens
        qx = torch.full((B, N), 1.0 / V, device=device)        # each draft's probability under its q
        # The draft distributions of the window's positions c..c+window, on their supports; `fresh` marks
        # positions still holding their first (uniform) draft.
        q_prob = torch.zeros(B, window + 1, K, device=device)
        q_idx = torch.zeros(B, window + 1, K, dtype=torch.long, device=device)
        fresh = torch.ones(B, window + 1, dtype=torch.bool, device=device)
        final = torch.zeros(B, dtype=torch.long, device=device)                 # tokens final per row
        rows, steps = torch.arange(B, device=device), torch.arange(window + 1, device=device)
        c, forwards = 0, 0       # tokens cached (final in every row, fed unchanged), forwards run
        was_training = self.training
        self.eval()
        self.prepare_decoding(cond.shape[0] * (window + 1))
        try:
            while c < N:
                w = min(window, N - 1 - c)                  # drafts fed; distributions for positions c..c+w
                cache.length = 0 if c == 0 else P + c - 1
                self.tokens_final = c                       # what progress observers report (pipeline.py)
                feed = out[:, :w] if c == 0 else out[:, c - 1:c + w]
                logits = self(feed.repeat(2, 1) if guided else feed, cond if c == 0 else None,
                              cond_drop if c == 0 else None, kv_cache=cache)[:, -(w + 1):]
                forwards += 1
                logits = guide(logits, cfg_scale)
                p_prob, p_idx = support(logits / temperature, top_k, top_p)      # (B, w + 1, K) each
                pos = c + steps[:w + 1]                                          # (w + 1,)
                # Accept each draft with probability min(1, p(x) / q(x)) (u in [0, 1), so p(x) = 0 never
                # passes); only the drafts from the row's first non-final position count, and the first
                # rejection ends the row's run.
                x = out[:, c:c + w + 1]
                px = (p_prob * (p_idx == x[..., None])).sum(-1)                  # (B, w + 1)
                u = torch.rand(B, w + 1, device=device, generator=generator)
                bad = (u * qx[:, c:c + w + 1] >= px) & (pos[None, :] >= final[:, None])
                rejected = bad.any(-1)
                r = bad.int().argmax(-1)                                         # first rejection (if any)
                # The rejected draft is replaced by a draw from norm(max(0, p - q)) at its position.
                pr, pi = p_prob[rows, r], p_idx[rows, r]                         # (B, K)
                q_dense = torch.zeros(B, V, device=device).scatter_(1, q_idx[rows, r], q_prob[rows, r])
                q_at = torch.where(fresh[rows, r, None], torch.full_like(pr, 1.0 / V), q_dense.gather(1, pi))
                residual = (pr - q_at).clamp_min(0)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pr)
                pick = inverse_cdf(residual, generator)                          # (B, 1) index into K
                at = c + r
                out[rows, at] = torch.where(rejected, pi.gather(1, pick)[:, 0], out[rows, at])
                final = torch.where(rejected, at + 1, final.clamp_min(c + w + 1))
                # Jacobi step: every position of the window that is not final gets a new draft from its p,
                # which becomes its q.
                redraft = pos[None, :] >= final[:, None]                        # (B, w + 1)
                pick = inverse_cdf(p_prob, generator)                            # (B, w + 1, 1)
                out[:, c:c + w + 1] = torch.where(redraft, p_idx.gather(2, pick)[..., 0], x)
                qx[:, c:c + w + 1] = torch.where(redraft, p_prob.gather(2, pick)[..., 0], qx[:, c:c + w + 1])
                q_prob[:, :w + 1] = torch.where(redraft[..., None], p_prob, q_prob[:, :w + 1])
                q_idx[:, :w + 1] = torch.where(redraft[..., None], p_idx, q_idx[:, :w + 1])
                fresh[:, :w + 1] &= ~redraft
                # The fewest final tokens of any row: every row's tokens before it are final, and all but the
                # last of them were fed unchanged, so they stay cached (the last is fed again next time).
                shift = int(final.min()) - c
                c += shift
                if shift and c < N:  # the window moves on: positions entering it hold their uniform drafts
                    q_prob = torch.cat([q_prob[:, shift:], q_prob.new_zeros(B, min(shift, window + 1), K)], 1)
                    q_idx = torch.cat([q_idx[:, shift:], q_idx.new_zeros(B, min(shift, window + 1), K)], 1)
                    fresh = torch.cat([fresh[:, shift:], fresh.new_ones(B, min(shift, window + 1))], 1)
        finally:
            self.train(was_training)
            self.tokens_final = None
        self.last_forwards = forwards
        return out

    @torch.no_grad()
    def sample_zipar(self, cond: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
                     n_tokens: int | None = None, window: int = 4, width: int | None = None) -> torch.Tensor:
        """Row-parallel decoding (ZipAR, He et al. 2024): the grid (width tokens a row; default the side of a
        square grid) is decoded as a wavefront in which row r + 1 starts once row r has `window` tokens, and
        every forward draws the next token of each row under way, so a grid of h rows takes
        (h - 1) * window + width forwards instead of h * width (window >= width: plain one-token decoding,
        the same tokens for a seed). A token sees every token already drawn before it in raster order: the
        row above up to `window` - 1 columns to its right, not beyond. That is an approximation of the
        distribution the GPT was trained on (measure its fidelity), exact only for window >= width.

        Bookkeeping, per forward: each row under way feeds the token before its next one at that token's
        raster slot of a full-length cache; the keys and values go to those slots and each query attends to
        the written slots at or before its own. When a row starts, the row above's slots not drawn yet get
        stand-ins, so the rows below see no holes (and a row's first token is predicted from the row above's
        last slot): the column's token in the nearest row above that has it, else that row's first token.
        A real token replaces its stand-in when it is drawn. (The stand-ins matter: with the row above's
        newest token in the last slot only, the shipped Shapes GPT drew 83.3% of its samples right at window
        4, with these 90.8%; one-token decoding 93.2%.) The schedule does not depend on the tokens, so every
        grid of the batch shares it. Guidance, temperature, top-k, top-p and the generator as in one-token
        decoding; `self.last_forwards` counts the forwards."""
        N = n_tokens or self.cfg.n_tokens
        W = width or math.isqrt(N)
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        if W < 1 or N % W:
            raise ValueError(f"zipar decodes rows: {N} tokens are not rows of {W} (pass width)")
        H, w, P = N // W, min(window, W), self.cfg.n_prefix
        B, device = cond.shape[0], cond.device
        guided = cfg_scale != 1.0
        cond, cond_drop = guidance_rows(cond, cfg_scale)
        rows = cond.shape[0]
        out = torch.empty(B, N, dtype=torch.long, device=device)
        last = P + N - 1                                  # cache slots: the prefix, then tokens 0..N-2
        cache = self.new_kv_cache(rows, last)
        was_training = self.training
        self.eval()
        self.prepare_decoding(rows * (-(-W // w) + 2))

        def pick(logits: torch.Tensor) -> torch.Tensor:   # (rows, T, vocab) -> (B, T) tokens
            logits = guide(logits, cfg_scale)
            T = logits.shape[1]
            return draw(logits.flatten(0, 1) / temperature, top_k, top_p, generator).view(B, T)

        def stand_in(r: int, j: int, t: int) -> int:
            """The token fed at (row r, column j) before it is drawn, when the row below starts (step t): the
            column's token in the nearest row above that has it (pictures are alike from row to row), else
            row r's first token."""
            for above in range(r - 1, -1, -1):
                if above * w + j < t:
                    return above * W + j
            return r * W

        try:
            self.tokens_final = 0
            out[:, :1] = pick(self(out[:, :0].repeat(2, 1) if guided else out[:, :0], cond, cond_drop,
                                   kv_cache=cache)[:, -1:])                       # the prefill draws token 0
            static = StaticKVCache(cache)
            slot_ids = static.slots
            written = slot_ids < P                          # the prefix's slots
            real = [s < P for s in range(last)]             # slots holding their real token (not a stand-in)
            drawn, forwards = 1, 1
            for t in range(1, (H - 1) * w + W):
                feed: dict[int, int] = {}                   # slot -> token index fed there
                targets = []                                # (query slot, token index it predicts)
                for r in range(H):
                    c = t - r * w
                    if not 0 <= c < W:
                        continue
                    p = r * W + c
                    feed[P + p - 1] = p - 1                 # the token before p (or a stand-in, below)
                    targets.append((P + p - 1, p))
                    if c == 0 and r > 0:                    # a row starts: stand-ins for the row above's rest
                        for j in range(t - (r - 1) * w, W):
                            feed[P + (r - 1) * W + j] = stand_in(r - 1, j, t)
                for r in range(H - 1):                      # a row's last token, drawn last step: to its slot
                    s = P + r * W + W - 1
                    if t - 1 == r * w + W - 1 and s not in feed and not real[s]:
                        feed[s] = r * W + W - 1
                slots = sorted(feed)
                src = torch.tensor([feed[s] for s in slots], device=device)
                pos = torch.tensor(slots, device=device)
                for s in slots:
                    written[s] = True
                    real[s] = feed[s] == s - P
                visible = written[None, :] & (slot_ids[None, :] <= pos[:, None])      # (T, slots)
                tokens = out[:, src]
                self.tokens_final = drawn
                logits = self.step_at(tokens.repeat(2, 1) if guided else tokens, pos, static, visible)
                for hook in list(self._forward_hooks.values()):   # a step is a forward to its observers
                    hook(self, (tokens,), logits)
                forwards += 1
                at = torch.tensor([slots.index(q) for q, _ in targets], device=device)
                out[:, [p for _, p in targets]] = pick(logits[:, at])
                drawn += len(targets)
        finally:
            self.train(was_training)
            self.tokens_final = None
        self.last_forwards = forwards
        return out

    def step_at(self, feed: torch.Tensor, slots: torch.Tensor, cache: StaticKVCache,
                visible: torch.Tensor) -> torch.Tensor:
        """One decode step that feeds tokens at chosen cache slots: feed (rows, T), slots (T,) -> logits
        (rows, T, vocab) of what follows each; `visible` (T, max_len) says which slots each query attends
        to (zipar). Writes the keys and values to those slots. Eval mode."""
        x = self.tok_emb(feed) + self.pos_emb[0].index_select(0, slots)
        cache.pos, cache.mask = slots, visible
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return self.head(self.ln_f(x))

    def step_static(self, feed: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """One decode step of fixed shapes: feed (rows, 1), the token at position ``cache.pos`` -> logits
        (rows, vocab) of the next. Reads the position from the tensor, so the same call serves every step
        (and can be captured as a graph); does not advance ``cache.pos`` (the caller does). Eval mode."""
        x = self.tok_emb(feed) + self.pos_emb[0].index_select(0, cache.pos.view(1))
        cache.mask = (cache.slots <= cache.pos)[None]                          # (1, max_len): slots written
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return self.head(self.ln_f(x))[:, 0]

    def static_stepper(self, cache: KVCache, graph: bool = False):
        """From a prefilled cache: a function tokens (rows, 1) -> logits (rows, vocab) of the next position
        that runs ``step_static`` on a StaticKVCache made of `cache` and advances it. graph=True captures the
        step once as a CUDA graph (after a warm-up on a side stream, as torch.cuda.graphs asks) and replays
        it; the logits it returns are then the graph's output buffer, valid until the next call."""
        static = StaticKVCache(cache)
        feed = torch.zeros(cache.shape[0], 1, dtype=torch.long, device=static.pos.device)
        if graph:
            # Under autocast the weights' casts must be captured, not served from autocast's cache (its
            # tensors are freed when the autocast region ends, and a replay would read them): the capture runs
            # in a nested autocast with the cache off, as torch.cuda.graphs asks.
            amp = torch.is_autocast_enabled("cuda")

            def no_cache():
                return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) \
                    if amp else contextlib.nullcontext()
            # The warm-up and the capture write the zero token's key and value at slot pos: the first real
            # step writes the same slot again before anything reads it.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), no_cache():
                for _ in range(2):
                    self.step_static(feed, static)
            torch.cuda.current_stream().wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph), no_cache():
                out = self.step_static(feed, static)

        def run(tokens: torch.Tensor) -> torch.Tensor:
            feed.copy_(tokens)
            if graph:
                cuda_graph.replay()
                logits = out
            else:
                logits = self.step_static(feed, static)
            static.pos += 1
            for hook in list(self._forward_hooks.values()):   # a step is a forward to its observers (the
                hook(self, (tokens,), logits)                  # progress bars), captured or not
            return logits

        return run

    def prepare_decoding(self, rows: int) -> None:
        """Before a decode loop: prepack the weights for oneDNN where that pays (CPU; models/packed.py),
        unless ``pack_decoding`` is off. `rows` is the rows a step multiplies."""
        if self.pack_decoding:
            pack_linears(self, rows)

    # ----------------------------------------------------------------------------------------- optimiser

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as in GPT-2 practice: decay Linear weights only; biases, LayerNorms, embeddings,
        the position embedding and the null prefix are not pulled towards zero."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = list(self.parameters())
        return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


def draw(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row (B, 1) from softmax(filter_logits(logits, top_k, top_p)), drawn among the top-k
    candidates only: the multinomial's per-element random draws then cover k entries, not the vocabulary
    (16384 codes: 4 of 24 ms of a decode step on a CPU went to them). Same distribution as drawing from
    the filtered logits over the whole vocabulary; a different stream of tokens for a given seed."""
    prob, idx = support(logits, top_k, top_p)                              # (B, K) each
    return idx.gather(-1, torch.multinomial(prob, 1, generator=generator))


def guidance_rows(cond: torch.Tensor, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows a sampler runs for guidance: cond (B, D) itself when cfg_scale == 1, else 2B rows, [0, B)
    conditional and [B, 2B) null, with the cond_drop mask (2B,) that says which (None when unguided)."""
    if cfg_scale == 1.0:
        return cond, None
    B = cond.shape[0]
    return torch.cat([cond, cond]), torch.arange(2 * B, device=cond.device) >= B


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Logits of the rows guidance_rows made -> the guided logits of the B grids: null + cfg_scale *
    (conditional - null), in fp32 (the logits themselves when cfg_scale == 1)."""
    logits = logits.float()
    if cfg_scale == 1.0:
        return logits
    c, u = logits.chunk(2)
    return u + cfg_scale * (c - u)


def decoding_window(parallel: str, window: int | None, n_tokens: int) -> int:
    """The window GPT.sample uses for `parallel` when given `window` (None: the decoder's default, 8 drafts
    for sjd, half a row of a square grid for zipar)."""
    if window is not None:
        return window
    return 8 if parallel == "sjd" else max(1, math.isqrt(n_tokens) // 2)


def check_decoding(parallel: str | None, step: str, device: torch.device) -> None:
    """ValueError (one line) unless GPT.sample can decode with `parallel` and `step` on `device`."""
    if parallel is not None and parallel not in PARALLEL:
        raise ValueError(f"parallel {parallel!r}: the parallel decoders are {', '.join(map(repr, PARALLEL))}")
    if step not in STEPS:
        raise ValueError(f"step {step!r}: one of {', '.join(STEPS)}")
    if step == "cuda-graph" and device.type != "cuda":
        raise ValueError(f"step 'cuda-graph' captures a CUDA graph: it needs a CUDA device, not {device.type}")
    if parallel is not None and step != "eager":
        raise ValueError(f"parallel {parallel!r} feeds windows of tokens; step {step!r} is for one-token steps")


def inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row (..., 1) drawn in proportion to `weights` (..., K) (non-negative, positive sum) by
    inverting the cumulative sum at one uniform number per row: the distribution torch.multinomial draws
    from, at one random number per row where multinomial on a CPU draws one per entry (0.6 of a 1.6 ms
    verification step of the Shapes GPT went to them). Entries of weight 0 are never drawn."""
    cdf = weights.cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), device=cdf.device, generator=generator, dtype=cdf.dtype)
    total = cdf[..., -1:]
    v = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))   # < total, rounding too
    return torch.searchsorted(cdf, v, right=True)


def support(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., V) -> (prob, idx), each (..., K): the distribution draw() draws from, on its support
    (K = top_k < V: the top-k tokens, most likely first; else the whole vocabulary), zero outside the
    top-p nucleus as in filter_logits."""
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        vals, idx = torch.topk(logits, top_k, dim=-1)
    elif top_p is not None and top_p < 1.0:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    else:
        return F.softmax(logits, dim=-1), torch.arange(V, device=logits.device).expand(logits.shape)
    if top_p is not None and top_p < 1.0:
        probs = F.softmax(vals, dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[..., 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
    return F.softmax(vals, dim=-1), idx


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) with everything outside the top-k, then outside the top-p nucleus, set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the most likely
    token always stays). No host syncs: sort, cumsum and scatter run on the device.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]             # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


__all__ = ["GPTConfig", "GuidanceError", "ORIGINS", "PARALLEL", "PRESETS", "STEPS", "build_gpt", "GPT", "KVCache",
           "StaticKVCache", "check_decoding", "decoding_window", "draw", "guidance_rows", "guide", "filter_logits", "inverse_cdf", "support"]
