"""open_clip's standard CLIP (ViT image tower, causal text transformer) without importing open_clip.

`import open_clip` pulls in torchvision (for one batch-norm class), which pulls in torch._dynamo, and timm:
about 1.5 s of the 5 s that demo.py may take on 2 CPU cores. Inference only needs the plain architecture,
so this module builds the same module tree, with the same parameter names and the same forward computation,
for the configs that use nothing else: the project's own CLIPs (train_clip.py presets) and the common
open_clip ViT configs. Anything beyond that subset (timm or HF towers, ResNets, layer scale, attentional
pooling, custom blocks, ...) is not "lite" and models/clip.py builds it with open_clip as before.

tests/test_clip.py checks that both builds give the same outputs from the same weights.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# open_clip.constants, copied so that reading them does not import open_clip (values are OpenAI's).
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

# Config keys (open_clip's CLIPVisionCfg / CLIPTextCfg) this build follows, with the values it supports
# where only the default is; a key outside these makes a config not lite.
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
_VISION = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
_VISION_DEFAULTS = {"ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False, "no_ln_pre": False,
                    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                    "output_tokens": False, "timm_model_name": None, "block_type": None, "qk_norm": False,
                    "act_kwargs": None, "norm_kwargs": None}
_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TEXT_DEFAULTS = {"ls_init_value": None, "hf_model_name": None, "hf_tokenizer_name": None, "embed_cls": False,
                  "pad_id": 0, "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax",
                  "proj_bias": False, "proj_type": "linear", "output_tokens": False, "block_type": None,
                  "qk_norm": False, "act_kwargs": None, "norm_kwargs": None}
# open_clip's defaults for the keys a config may leave out
_VISION_FALLBACK = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                    "image_size": 224}
_TEXT_FALLBACK = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                  "mlp_ratio": 4.0}


def is_lite(config: dict) -> bool:
    """Whether `config` (open_clip's model-config format) uses only what this module builds."""
    if not isinstance(config, dict) or set(config) - _TOP_KEYS or "embed_dim" not in config:
        return False

    def plain(cfg, keys, defaults) -> bool:
        if not isinstance(cfg, dict):
            return False
        for k, v in cfg.items():
            if k in keys:
                continue
            if k not in defaults or v != defaults[k]:
                return False
        return True

    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if not (plain(vision, _VISION, _VISION_DEFAULTS) and plain(text, _TEXT, _TEXT_DEFAULTS)):
        return False
    return isinstance(vision.get("layers", 12), int)  # a list of layers means a ModifiedResNet


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: computed in the input's dtype after casting back (weights stay float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig = x.dtype
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(orig)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, act_layer)
                                       for _ in range(layers))

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


class VisionTransformer(nn.Module):
    """Patch embedding, class token, learnable positions, pre-LN, transformer, post-LN on the class
    token, projection: open_clip's VisionTransformer with pool_type 'tok' and nothing optional."""

    def __init__(self, image_size, patch_size, width: int, layers: int, heads: int, mlp_ratio: float,
                 output_dim: int, act_layer: type[nn.Module]):
        super().__init__()
        self.image_size, self.patch_size = _pair(image_size), _pair(patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1,
                                                                     width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 0] @ self.proj


class LiteCLIP(nn.Module):
    """open_clip.CLIP's layout: .visual, and the text tower's parts at the top level (transformer,
    token_embedding, positional_embedding, ln_final, text_projection, attn_mask buffer), logit_scale."""

    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict, quick_gelu: bool = False):
        super().__init__()
        act = QuickGELU if quick_gelu else nn.GELU
        v = {**_VISION_FALLBACK, **{k: vision_cfg[k] for k in _VISION if k in vision_cfg}}
        t = {**_TEXT_FALLBACK, **{k: text_cfg[k] for k in _TEXT if k in text_cfg}}
        self.visual = VisionTransformer(v["image_size"], v["patch_size"], v["width"], v["layers"],
                                        v["width"] // v["head_width"], v["mlp_ratio"], embed_dim, act)
        self.context_length, self.vocab_size = t["context_length"], t["vocab_size"]
        width = t["width"]
        self.transformer = Transformer(width, t["layers"], t["heads"], t["mlp_ratio"], act)
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        mask = torch.full((self.context_length, self.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(dtype) + self.positional_embedding.to(dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def build_lite(config: dict) -> LiteCLIP:
    """A LiteCLIP (random weights) for a config that is_lite() accepts."""
    if not is_lite(config):
        raise ValueError("this CLIP config needs open_clip to build it")
    return LiteCLIP(config["embed_dim"], config.get("vision_cfg", {}), config.get("text_cfg", {}),
                    bool(config.get("quick_gelu", False)))


@functools.lru_cache(maxsize=1)
def tokenizer_module():
    """open_clip's tokenizer module (SimpleTokenizer, its BPE vocabulary beside it). The real one when
    open_clip is imported already; otherwise the same file loaded on its own, which imports only ftfy,
    regex, numpy and torch (it has no package-relative imports)."""
    if "open_clip" in sys.modules:
        import open_clip.tokenizer

        return open_clip.tokenizer
    spec = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed (pip install open_clip_torch)")
    path = f"{list(spec.submodule_search_locations)[0]}/tokenizer.py"
    name = "_clipgen_open_clip_tokenizer"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    mod_spec.loader.exec_module(module)
    return module
