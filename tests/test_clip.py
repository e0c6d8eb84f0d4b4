"""The CLIP wrapper and its trainer: CLIP-GEN's OpenAI-format weights reproduce the reference features,
both encoders give frozen unit-norm float32 embeddings after CLIP's own preprocessing, over-long text is cut
with one warning, checkpoints round-trip, misuse ends in one line, and train_clip.py trains, saves a
checkpoint load_clip reads, and resumes exactly after a SIGTERM."""
import re
import signal
import subprocess
import sys
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image

from engine.checkpoint import CheckpointError
from evaluation.zero_shot import ZERO_SHOT_ATTRIBUTES, attribute_prompts, zero_shot_accuracy
from models.clip import CLIP, build_open_clip, load_clip
from tests import forkrun
from tests.compare import assert_states_match
from tests.conftest import COMPAT_DIR, REPO
from tests.test_train_vqgan import _env, _free_port, assert_same_tensors, interrupt_at, load_state
from train_clip import PRESETS, WHITE_ZERO

TINY = PRESETS["tiny"]["open_clip_config"]  # 32 px ViT, context 32


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return CLIP(build_open_clip(TINY), mean=WHITE_ZERO["mean"], std=WHITE_ZERO["std"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- CLIP-GEN compatibility ------------------------------------------------------------------------

def test_clipgen_state_dict_reproduces_reference_features():
    exp = torch.load(COMPAT_DIR / "clipgen_clip_small.expected.pt", map_location="cpu", weights_only=True)
    clip = load_clip(COMPAT_DIR / "clipgen_clip_small.pt")
    cfg = exp["config"]
    assert (clip.embed_dim, clip.image_size, clip.context_length) == (cfg["embed_dim"], cfg["img_size"],
                                                                     cfg["context_length"])
    assert torch.equal(clip.tokenize(exp["texts"]), exp["tokens"])  # OpenAI BPE, same ids
    assert rel_err(clip.text_features(exp["tokens"]), exp["text_features"]) < 1e-5
    assert rel_err(clip.image_features(exp["image"]), exp["image_features"]) < 1e-5
    # The high-level call is the same features, L2-normalised.
    assert rel_err(clip.encode_text(exp["texts"]), F.normalize(exp["text_features"], dim=-1)) < 1e-5


def test_state_dict_nested_under_a_key_or_with_module_prefix_loads(tmp_path):
    sd = torch.load(COMPAT_DIR / "clipgen_clip_small.pt", map_location="cpu", weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pt")
    exp = torch.load(COMPAT_DIR / "clipgen_clip_small.expected.pt", map_location="cpu", weights_only=True)
    clip = load_clip(tmp_path / "wrapped.pt")
    assert rel_err(clip.image_features(exp["image"]), exp["image_features"]) < 1e-5


# --- the wrapper's contract -----------------------------------------------------------------------

def test_embeddings_are_unit_norm_float32_and_frozen(tiny_clip):
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    parent = torch.nn.Sequential(tiny_clip, torch.nn.Linear(2, 2))
    parent.train()  # a stage that owns CLIP switches itself to training mode
    assert not tiny_clip.training and not tiny_clip.model.training
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # callers may run under autocast
        e_img = tiny_clip.encode_image(images.requires_grad_())
        e_txt = tiny_clip.encode_text(["a red circle", "a small blue square in the top left"])
    for e, n in ((e_img, 3), (e_txt, 2)):
        assert e.shape == (n, TINY["embed_dim"]) and e.dtype == torch.float32 and not e.requires_grad
        assert torch.allclose(e.norm(dim=-1), torch.ones(n), atol=1e-5)
    assert tiny_clip.embed_dim == 32 and tiny_clip.image_size == 32 and tiny_clip.context_length == 32


def test_encode_image_resizes_and_normalises_like_clip(tiny_clip):
    x = torch.rand(2, 3, 48, 40) * 2 - 1  # neither square nor CLIP's size
    # The reference: torchvision's Resize(shorter side) + CenterCrop on [0, 1] images, then mean/std.
    ref = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32)])
    pixels = (ref((x + 1) / 2).clamp(0, 1) - tiny_clip.mean) / tiny_clip.std
    assert torch.allclose(tiny_clip.preprocess(x), pixels, atol=1e-6)
    expected = F.normalize(tiny_clip.model.encode_image(pixels), dim=-1)
    assert torch.allclose(tiny_clip.encode_image(x), expected, atol=1e-5)
    # Out-of-range decoder outputs are clipped to the image range first.
    assert torch.equal(tiny_clip.preprocess(x * 3), tiny_clip.preprocess((x * 3).clamp(-1, 1)))


def test_preprocessing_agrees_with_open_clips_pil_pipeline():
    """open_clip's own eval transform works on 8-bit PIL images (rounding, PIL's bicubic): close, not equal."""
    clip = CLIP(build_open_clip(TINY))  # OpenAI mean/std, open_clip's default
    arr = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 127.5 - 1
    ref = open_clip.image_transform(32, is_train=False)(Image.fromarray(arr))[None]
    assert (clip.preprocess(x) - ref).abs().mean() < 0.02


def test_overlong_text_is_truncated_with_one_warning(tiny_clip):
    texts = ["a " * 100, "b " * 50, "a red circle"]  # 102 and 52 tokens with start/end; context 32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = tiny_clip.tokenize(texts)
        tiny_clip.encode_text(texts)
    assert len(caught) == 2  # one per call, not one per text
    msg = str(caught[0].message)
    assert "2 of 3" in msg and "90 token(s)" in msg and "context of 32" in msg, msg
    assert caught[1].filename == __file__  # points at the caller of encode_text
    # Same ids as open_clip's tokenizer, which truncates silently: the end token is kept.
    assert torch.equal(tokens, open_clip.tokenizer.SimpleTokenizer(context_length=32)(texts))
    assert tokens[0, -1].item() == 49407
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_clip.encode_text(["a small red circle in the top left"])  # fits: no warning


# --- loading --------------------------------------------------------------------------------------

def test_project_checkpoint_round_trip(tmp_path, tiny_clip):
    state = {"kind": "clip", "open_clip_config": TINY, "preprocess": WHITE_ZERO,
             "model": tiny_clip.model.state_dict(), "step": 7}
    torch.save(state, tmp_path / "clip.pt")
    loaded = load_clip(str(tmp_path / "clip.pt"))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(loaded.mean, tiny_clip.mean) and torch.equal(loaded.std, tiny_clip.std)
    assert torch.equal(loaded.encode_image(images), tiny_clip.encode_image(images))
    assert torch.equal(loaded.encode_text(["a red circle"]), tiny_clip.encode_text(["a red circle"]))
    # EMA weights win when the checkpoint has them.
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save({**state, "ema": ema}, tmp_path / "ema.pt")
    assert not torch.equal(load_clip(tmp_path / "ema.pt").encode_image(images), tiny_clip.encode_image(images))


# --- the lite build (no open_clip import) ------------------------------------------------------------

LITE_CONFIGS = [
    TINY,
    PRESETS["shapes"]["open_clip_config"],
    {"embed_dim": 48, "quick_gelu": True,  # QuickGELU, a non-default MLP ratio, open_clip's key defaults
     "vision_cfg": {"image_size": 48, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16,
                    "mlp_ratio": 2.0, "patch_dropout": 0.0, "pool_type": "tok"},
     "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2,
                  "pool_type": "argmax", "proj_type": "linear"}},
]


@pytest.mark.parametrize("config", LITE_CONFIGS, ids=["tiny", "shapes", "quick_gelu"])
def test_lite_build_equals_open_clip(config):
    """Same parameter names and the same features from the same weights, so a checkpoint written from an
    open_clip model loads into either and means the same."""
    from models.clip_lite import build_lite, is_lite

    assert is_lite(config)
    torch.manual_seed(0)
    ref = build_open_clip(config).eval()
    lite = build_lite(config).eval()
    assert set(lite.state_dict()) == set(ref.state_dict())
    lite.load_state_dict(ref.state_dict(), strict=True)
    size = ref.visual.image_size
    images = torch.randn(3, 3, *((size, size) if isinstance(size, int) else size))
    text = torch.zeros(3, ref.context_length, dtype=torch.long)
    for i, n in enumerate((3, 7, ref.context_length)):  # start, words, end token (the largest id) at n-1
        text[i, :n] = torch.randint(1, 49000, (n,))
        text[i, 0], text[i, n - 1] = 49406, 49407
    with torch.no_grad():
        assert torch.allclose(lite.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=1e-5)
        assert torch.allclose(lite.encode_text(text), ref.encode_text(text), atol=1e-5, rtol=1e-5)
    assert torch.equal(lite.attn_mask, ref.attn_mask)
    assert lite.context_length == ref.context_length and lite.visual.output_dim == ref.visual.output_dim


@pytest.mark.parametrize("change", [
    {"vision_cfg": {"ls_init_value": 1e-5}}, {"vision_cfg": {"timm_model_name": "vit_tiny"}},
    {"vision_cfg": {"layers": [1, 1, 1, 1]}}, {"vision_cfg": {"pool_type": "avg"}},
    {"text_cfg": {"hf_tokenizer_name": "bert"}}, {"text_cfg": {"proj_bias": True}},
    {"custom_text": True}, {"init_logit_bias": -10},
])
def test_configs_beyond_the_plain_vit_are_built_by_open_clip(change):
    from models.clip import build_for_inference
    from models.clip_lite import is_lite

    config = {**TINY, **{k: v for k, v in change.items() if not isinstance(v, dict)}}
    for k, v in change.items():
        if isinstance(v, dict):
            config[k] = {**TINY[k], **v}
    assert not is_lite(config)
    if change.get("vision_cfg", {}).get("timm_model_name") is None:  # timm towers need timm's model zoo
        assert type(build_for_inference(config)).__module__.startswith("open_clip.")
    assert type(build_for_inference(TINY)).__name__ == "LiteCLIP"


def test_lite_constants_and_tokenizer_are_open_clips():
    from models import clip_lite
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert clip_lite.OPENAI_DATASET_MEAN == tuple(OPENAI_DATASET_MEAN)
    assert clip_lite.OPENAI_DATASET_STD == tuple(OPENAI_DATASET_STD)
    texts = ["a large red circle in the top left", "Ünïcode — ok?", "", "a " * 40]
    assert torch.equal(open_clip.tokenize(texts, context_length=32),
                       clip_lite.tokenizer_module().SimpleTokenizer(context_length=32)(texts))


def test_loading_a_project_clip_does_not_import_open_clip(tmp_path, tiny_clip):
    """The inference path (demo.py, evaluate.py, the trainers' frozen CLIP) stays clear of open_clip's
    import cost: torchvision, torch._dynamo and timm stay unloaded, and the features are the model's."""
    state = {"kind": "clip", "open_clip_config": TINY, "preprocess": WHITE_ZERO,
             "model": tiny_clip.model.state_dict()}
    torch.save(state, tmp_path / "clip.pt")
    expected = tiny_clip.encode_text(["a red circle in the top left"])
    torch.save(expected, tmp_path / "expected.pt")
    code = (f"import sys, torch; from models.clip import load_clip; "
            f"c = load_clip({str(tmp_path / 'clip.pt')!r}); e = c.encode_text(['a red circle in the top left']); "
            f"assert torch.equal(e, torch.load({str(tmp_path / 'expected.pt')!r})), 'features differ'; "
            f"print(sorted(m for m in ('open_clip', 'torchvision', 'timm', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _error_cases(tmp_path):
    torch.save({"kind": "gpt", "model": {}}, tmp_path / "gpt.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"visual.proj": torch.zeros(4, 4)}, tmp_path / "partial.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "jit.pt")
    broken = {"kind": "clip", "open_clip_config": TINY, "model": {"logit_scale": torch.zeros(())}}
    torch.save(broken, tmp_path / "broken.pt")
    return [
        (tmp_path / "missing.pt", "checkpoint not found"),
        (tmp_path / "gpt.pt", "is a gpt checkpoint, not a CLIP checkpoint"),
        (tmp_path / "junk.pt", "cannot read checkpoint"),
        (tmp_path / "partial.pt", "does not fit OpenAI's CLIP layout"),
        (tmp_path / "other.pt", "nor an OpenAI-format CLIP state dict"),
        (tmp_path / "jit.pt", "TorchScript archive"),
        (tmp_path / "broken.pt", "broken CLIP checkpoint"),
        ("nonsense", "neither a checkpoint file nor an open_clip NAME:TAG"),
        ("ViT-B-32:no-such-tag", "cannot load open_clip ViT-B-32:no-such-tag"),
        (("ViT-B-32", ""), "needs pretrained weights"),
    ]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script/save, used to write a TorchScript file
def test_user_errors_are_one_line(tmp_path):
    for spec, needle in _error_cases(tmp_path):
        with pytest.raises(CheckpointError) as e:
            load_clip(spec)
        assert needle in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))


def test_failed_download_is_a_one_line_error(monkeypatch):
    def offline(*a, **k):
        raise RuntimeError("Failed to download file (open_clip_pytorch_model.bin)\nmore detail")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(CheckpointError, match=r"cannot load open_clip ViT-B-32:openai .*Failed to download") as e:
        load_clip("ViT-B-32:openai")
    assert "\n" not in str(e.value)


# --- zero-shot evaluation -------------------------------------------------------------------------

def test_zero_shot_prompts_name_one_attribute_per_class():
    assert attribute_prompts("color")[0] == ["a red shape"]
    assert attribute_prompts("position")[0] == ["a shape in the top left"]
    assert [len(p) for p in attribute_prompts("shape")] == [1] * 4
    ens = attribute_prompts("size", "ensemble")
    assert len(ens) == 2 and len(ens[0]) == 32 and all(p.split()[1] == "small" for p in ens[0])


def test_zero_shot_accuracy_counts_each_attribute(tiny_clip):
    from datasets import ShapesDataset

    acc = zero_shot_accuracy(tiny_clip, ShapesDataset("captioned-val", 12), batch_size=5)
    assert set(acc) == set(ZERO_SHOT_ATTRIBUTES) and all(0.0 <= v <= 1.0 for v in acc.values())


# --- train_clip.py --------------------------------------------------------------------------------

BASE = ["--preset", "tiny", "--no-tensorboard", "--log-every", "1", "--num-workers", "0"]


def run_train(args, timeout=300):
    return forkrun.run("train_clip.py", *BASE, *args, timeout=timeout)


def test_tiny_run_lowers_loss_and_writes_a_checkpoint_load_clip_reads(tmp_path):
    r = run_train(["--max-steps", "40", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "3",
                   "--val-every", "40", "--shapes-val-size", "24", "--out-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    losses = [float(m) for m in re.findall(r"^step \d+/40 loss (\S+)", r.stdout, re.M)]
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert re.search(r"^val ensemble: color \S+ shape \S+ size \S+ position \S+$", r.stdout, re.M)
    assert "done: step 40" in r.stdout
    state = load_state(tmp_path / "latest.pt")
    assert state["kind"] == "clip" and state["step"] == 40 and state["open_clip_config"] == TINY
    for key in ("model", "optimizer", "rng", "preprocess", "epoch", "metrics", "best_min_accuracy"):
        assert key in state
    clip = load_clip(tmp_path / "best.pt")
    assert clip.embed_dim == 32 and torch.equal(clip.mean.flatten(), torch.tensor(WHITE_ZERO["mean"]))
    assert clip.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 32)


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
    # 32 training images at 8 a step = 4 steps an epoch, so the runs cross epochs.
    common = ["--max-steps", "10", "--batch-size", "8", "--shapes-train-size", "32", "--shapes-val-size", "8",
              "--val-every", "5", "--save-every", "100", "--warmup-steps", "2"]
    full = run_train(common + ["--out-dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr

    out = tmp_path / "cut"
    rc, stdout, stderr = interrupt_at([sys.executable, "train_clip.py", *BASE, *common, "--out-dir", str(out)],
                                      "step 3/10", signal.SIGTERM)
    assert rc == 0, stderr
    assert "received SIGTERM" in stdout
    stopped_at = load_state(out / "latest.pt")["step"]
    assert 3 <= stopped_at < 10

    resumed = run_train(common + ["--out-dir", str(out), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped_at}" in resumed.stdout
    a, b = load_state(tmp_path / "full" / "latest.pt"), load_state(out / "latest.pt")
    assert a["step"] == b["step"] == 10
    assert_same_tensors(a["model"], b["model"])
    for k in a["optimizer"]["state"]:
        assert_same_tensors(a["optimizer"]["state"][k], b["optimizer"]["state"][k])
    assert a["metrics"] == b["metrics"]


def test_trainer_errors_end_in_one_line(tmp_path):
    torch.save({"kind": "vqgan", "model": {}}, tmp_path / "vqgan.pt")
    for args, needle in ((["--resume", str(tmp_path / "missing.pt")], "checkpoint not found"),
                         (["--resume", str(tmp_path / "vqgan.pt")], "not a CLIP training checkpoint")):
        r = run_train(args + ["--max-steps", "1", "--out-dir", str(tmp_path / "out")], timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and needle in last, r.stderr


def test_two_gloo_processes_equal_one_process(tmp_path):
    """The contrastive loss spans the global batch: each rank's features are gathered with their gradients,
    so 2 processes of 4 images take the step 1 process of 8 takes."""
    common = ["--max-steps", "4", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "0", "--val-every", "4",
              "--shapes-val-size", "8", "--device", "cpu", "--precision", "fp32"]
    one = run_train(common + ["--out-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port())]
    two = subprocess.run(torchrun + ["train_clip.py", *BASE, *common, "--out-dir", str(tmp_path / "two")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stdout
    a, b = load_state(tmp_path / "one" / "latest.pt"), load_state(tmp_path / "two" / "latest.pt")
    assert a["step"] == b["step"] == 4
    # Each tensor on its own (tests/compare.py); every element within 1e-4: float summation order (measured
    # 3e-6), where 1 process on 4 images differs by 1.6e-2.
    assert_states_match(a["model"], b["model"], "model", bound=1e-4)
