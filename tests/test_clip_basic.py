"""CLIP wrapper: the CLIP-GEN (OpenAI-format) fixture reproduces, embeddings are unit-norm and frozen,
over-long text warns, and a train_clip.py checkpoint loads back through load_clip."""
import subprocess
import sys
import warnings

import pytest
import torch

from models.clip import load_clip
from tests.conftest import COMPAT_DIR, REPO
from tests.test_train_vqgan import _env

needs_fixtures = pytest.mark.skipif(COMPAT_DIR is None, reason="compat fixtures not found")


@needs_fixtures
def test_clipgen_openai_state_dict_reproduces_its_features():
    ex = torch.load(COMPAT_DIR / "clipgen_clip_small.expected.pt", weights_only=True)
    clip = load_clip(str(COMPAT_DIR / "clipgen_clip_small.pt"))
    for got, want in ((clip.text_features(ex["tokens"]), ex["text_features"]),
                      (clip.image_features(ex["image"]), ex["image_features"])):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    r = subprocess.run([sys.executable, "train_clip.py", "--preset", "tiny", "--max-steps", "4", "--val-every", "4",
                        "--shapes-val-size", "16", "--num-workers", "0", "--no-tensorboard", "--out-dir", str(out)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "done: step 4" in r.stdout
    return load_clip(str(out / "latest.pt"))


def test_embeddings_are_unit_norm_and_frozen(tiny_clip):
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    e_img, e_txt = tiny_clip.encode_image(images), tiny_clip.encode_text(["a red circle", "a blue square"])
    assert e_img.shape == (3, tiny_clip.embed_dim) and e_txt.shape == (2, tiny_clip.embed_dim)
    assert torch.allclose(e_img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(e_txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not e_img.requires_grad and not any(p.requires_grad for p in tiny_clip.parameters())
    assert not tiny_clip.training


def test_overlong_text_is_truncated_with_a_warning(tiny_clip):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = tiny_clip.encode_text(["a red circle " * 40])
    assert e.shape[0] == 1 and any("trunc" in str(w.message).lower() for w in caught)


def test_missing_clip_checkpoint_is_one_clear_error(tmp_path):
    from engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        load_clip(str(tmp_path / "nope.pt"))
