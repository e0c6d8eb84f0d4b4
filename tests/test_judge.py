"""The Shapes-world judge reads attributes back from pixels: right on ground-truth renders (the issue asks
>= 99%), robust to blur, and it says so when there is no object; `python -m evaluation.judge_check`
reproduces the README's claim (all right on 3000 renders and 512 reconstructions by the shipped VQGAN)."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from datasets.shapes import SPLIT_SEEDS, render, sample_attributes
from evaluation.judge import judge

ATTRS = ("color", "shape", "size", "row", "col")


def _share_right(n: int, blur: float = 0.0) -> float:
    right = 0
    for i in range(n):
        spec = sample_attributes(SPLIT_SEEDS["test"], i)
        image = render(spec)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        got = judge(image).labels()
        right += all(got[k] == spec.labels()[k] for k in ATTRS)
    return right / n


def test_judge_is_right_on_ground_truth_renders():
    assert _share_right(600) >= 0.99


def test_judge_survives_decoder_like_blur():
    assert _share_right(200, blur=0.8) >= 0.97


def test_blank_image_has_no_object():
    assert not judge(Image.new("RGB", (64, 64), (255, 255, 255))).found
    noisy = np.clip(255 - np.random.default_rng(0).integers(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert not judge(noisy).found


def test_judge_accepts_vqgan_range_tensors():
    import torch

    spec = sample_attributes(SPLIT_SEEDS["test"], 3)
    arr = np.asarray(render(spec), dtype=np.float32)
    tensor = torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1
    assert judge(tensor).labels() == spec.labels()


# --- the README's claim, reproduced by `python -m evaluation.judge_check` ------------------------------

SHIPPED_VQGAN = "pretrained/shapes/vqgan.safetensors"


def test_judge_check_reads_renders_and_shipped_vqgan_reconstructions_all_right():
    from evaluation.judge_check import check

    r = check(renders=300, reconstructions=16, vqgan=SHIPPED_VQGAN)
    assert r["renders"]["n"] == 300 and r["reconstructions"]["n"] == 16
    assert r["renders"]["all"] == 1.0 and r["reconstructions"]["all"] == 1.0, r


def test_judge_check_fails_when_the_claim_does_not_hold(capsys):
    from evaluation.judge_check import main

    assert main(["--renders", "20", "--reconstructions", "0"]) == 0
    assert main(["--renders", "20", "--reconstructions", "0", "--min-share", "1.01"]) == 1
    out = capsys.readouterr()
    assert "20 renders: 100.00% all attributes right" in out.out and "claim not reproduced" in out.err


@pytest.mark.slow
def test_judge_check_reproduces_the_readme_claim():
    """README: 100% right on 3000 ground-truth renders and on 512 VQGAN reconstructions (~70 s on 2 cores)."""
    from evaluation.judge_check import main

    assert main(["--renders", "3000", "--reconstructions", "512", "--vqgan", SHIPPED_VQGAN]) == 0
