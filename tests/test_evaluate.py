"""evaluate.py: its statistics (the Fréchet distance, the diversity of unnamed attributes), real captioned
images (CLIP score against the captions, FID end to end through torch-fidelity with a feature network the
test provides), the one-line refusals (no Inception weights, no torch-fidelity, guidance without a trained
null condition), all before anything is sampled."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from datasets import EvalTransform, shapes
from engine.cli import run, user_errors
from evaluate import diversity, frechet_distance, main, parse_args, right
from evaluation.fid import INCEPTION_FILE
from models.pipeline import TextToImage
from tests.tiny import tiny_gpt, write_tiny


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    # Columns 1..3 of a Hadamard matrix are zero-mean and orthogonal: the sample covariance is exactly diagonal.
    h = _hadamard(8)[:, 1:4]
    sa, sb, shift = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 0.5, 0.5]), torch.tensor([1.0, -2.0, 0.0])
    a, b = h * sa, h * sb + shift
    var_a, var_b = sa.double() ** 2 * 8 / 7, sb.double() ** 2 * 8 / 7
    expected = shift.double().square().sum() + (var_a + var_b - 2 * (var_a * var_b).sqrt()).sum()
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-9)


def test_frechet_distance_is_zero_for_one_set_and_rotation_invariant():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(500, 6, generator=g) * 2 + 1
    assert abs(frechet_distance(a, a)) < 1e-8
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(frechet_distance(a, b), rel=1e-6)
    assert frechet_distance(a, b) > 1.0


def _j(found=True, color=0, shape=0, size=0, row=0, col=0):
    return SimpleNamespace(found=found, color=color, shape=shape, size=size, row=row, col=col,
                           labels=lambda: {"color": color, "shape": shape, "size": size, "row": row, "col": col})


def test_diversity_counts_distinct_values_of_found_objects():
    judged = [_j(row=r, col=c) for r in range(3) for c in range(3)] + [_j(found=False, row=2, col=2)]
    assert diversity(judged, "position") == (9, pytest.approx(1.0))
    same = [_j(row=1, col=1)] * 5
    assert diversity(same, "position") == (1, 0.0)
    assert diversity([_j(found=False)], "color") == (0, 0.0)
    two = [_j(size=0), _j(size=1)]
    assert diversity(two, "size") == (2, pytest.approx(1.0))


def test_right_needs_an_object_and_every_named_attribute():
    spec = shapes.sample_attributes(3000, 0)
    lab = spec.labels()
    ok = _j(**lab)
    assert all(right(spec, ok, shapes.ATTRIBUTES).values())
    wrong_cell = _j(**{**lab, "col": (lab["col"] + 1) % 3})
    r = right(spec, wrong_cell, shapes.ATTRIBUTES)
    assert not r["position"] and r["color"] and r["shape"]
    assert not any(right(spec, _j(found=False, **lab), shapes.ATTRIBUTES).values())


# --- real captioned images and FID ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = write_tiny(tmp_path_factory.mktemp("eval"))
    return ["--vqgan", str(root / "vqgan.pt"), "--gpt", str(root / "gpt.pt"), "--clip", str(root / "clip.pt"),
            "--device", "cpu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """5 captioned images (a.png + a.txt; not square, one in a subfolder), one without a caption file and one
    with an empty one: (root, [(path, caption)] in sorted path order)."""
    root = tmp_path_factory.mktemp("captioned")
    (root / "sub").mkdir()
    captioned = []
    for i, name in enumerate(["a", "b", "c", "sub/d", "sub/e", "no_caption", "empty_caption"]):
        spec = shapes.sample_attributes(shapes.SPLIT_SEEDS["test"], i)
        path = root / f"{name}.png"
        shapes.render(spec).resize((80, 64)).save(path)
        caption = shapes.describe(spec, shapes.ATTRIBUTES)
        if name == "empty_caption":
            (root / f"{name}.txt").write_text("\n")
        elif name != "no_caption":
            (root / f"{name}.txt").write_text(caption + "\n")
            captioned.append((path, caption))
    return root, sorted(captioned)


class TinyFeatures(nn.Module):
    """The FID's feature network for tests: one strided conv, 4 features; it keeps every batch it is given."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(1))
        self.seen = []

    def forward(self, x):  # (B, 3, H, W) in [-1, 1] -> (B, 4)
        self.seen.append(x.clone())
        return self.conv(x).mean((2, 3))


def _quantised(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 127.5).round() / 127.5 - 1


def test_folder_with_captions_gives_clip_scores_and_fid_end_to_end(tiny, folder, tmp_path, capsys):
    from models.clip import load_clip

    root, captioned = folder
    net = TinyFeatures()
    out = tmp_path / "r.json"
    main(parse_args([*tiny, "--dataset", "folder", "--data-path", str(root), "--prompts", "50", "--samples", "2",
                     "--batch-size", "4", "--fid", "--json", str(out)]), fid_features=net)
    res = json.loads(out.read_text())
    assert res["prompts"] == 5 and res["dataset"] == "folder"  # the images without a caption are left out
    # torch-fidelity ran the given network on the 10 samples, then on the 5 real images as the VQGAN sees them.
    fake, real = net.seen
    assert fake.shape == (10, 3, 64, 64)
    expected = torch.stack([EvalTransform(64)(Image.open(p).convert("RGB")) for p, _ in captioned])
    assert torch.allclose(real, _quantised(expected), atol=1e-6)
    with torch.no_grad():
        assert res["fid"] == pytest.approx(frechet_distance(net.conv(fake).mean((2, 3)), net.conv(real).mean((2, 3))),
                                           rel=1e-4, abs=1e-6)
    # The real images' CLIP score: each image against its own caption.
    clip = load_clip(tiny[tiny.index("--clip") + 1])
    cos = (clip.encode_image(expected) * clip.encode_text([c for _, c in captioned])).sum(-1)
    assert res["clip_score"]["real"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert -1 <= res["clip_score"]["raw"] <= res["clip_score"]["reranked"] <= 1  # the kept one scores best
    assert res["clip_fd_real_images"] == 5 and res["clip_fd"] > 0
    text = capsys.readouterr().out
    assert "| real images (reference) |" in text and "FID (features of TinyFeatures) to 5 real images" in text


def test_coco_captions_are_the_prompts(tiny, folder, tmp_path, monkeypatch):
    root, captioned = folder
    images = [{"id": i + 1, "file_name": str(p.relative_to(root))} for i, (p, _) in enumerate(captioned[:3])]
    anns = [{"id": 10 + i, "image_id": im["id"], "caption": f"{captioned[i][1]}"} for i, im in enumerate(images)]
    anns.append({"id": 99, "image_id": 1, "caption": "a second caption, not the first"})
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    from models.clip import CLIP

    seen, encode_text = [], CLIP.encode_text
    monkeypatch.setattr(CLIP, "encode_text", lambda self, texts: seen.extend(texts) or encode_text(self, texts))
    out = tmp_path / "r.json"
    main(parse_args([*tiny, "--dataset", "coco", "--data-path", str(root), "--coco-annotations",
                     str(tmp_path / "captions.json"), "--prompts", "3", "--samples", "1", "--json", str(out)]))
    assert json.loads(out.read_text())["prompts"] == 3
    assert seen == [c for _, c in captioned[:3]]  # each image's first caption, in image-id order


def test_shapes_fid_goes_through_the_same_path(tiny, tmp_path):
    net = TinyFeatures()
    out = tmp_path / "r.json"
    main(parse_args([*tiny, "--prompts", "2", "--samples", "2", "--fid", "--json", str(out)]), fid_features=net)
    res = json.loads(out.read_text())
    fake, real = net.seen
    assert fake.shape == real.shape == (4, 3, 64, 64) and res["clip_fd_real_images"] == 4
    with torch.no_grad():
        assert res["fid"] == pytest.approx(frechet_distance(net.conv(fake).mean((2, 3)), net.conv(real).mean((2, 3))),
                                           rel=1e-4, abs=1e-6)
    assert set(res["raw"]) == {"color", "shape", "size", "position", "all"}  # the Shapes report, unchanged


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(TextToImage, "sample_conds", refuse)


def test_fid_without_inception_weights_is_one_line_and_never_downloads(tiny, folder, tmp_path, monkeypatch,
                                                                        capsys, no_sampling):
    import socket

    def offline(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache
    root, _ = folder
    with pytest.raises(SystemExit) as e:
        run(main, parse_args([*tiny, "--dataset", "folder", "--data-path", str(root), "--fid"]))
    err = capsys.readouterr()
    assert e.value.code == 2 and err.out == ""
    assert err.err.startswith("error: FID needs torch-fidelity's Inception weights") and err.err.count("\n") == 1
    assert INCEPTION_FILE in err.err and str(tmp_path / "torch-home") in err.err and "--inception-weights" in err.err


def test_fid_refuses_a_missing_or_unsafe_weights_file_before_sampling(tiny, tmp_path, monkeypatch, no_sampling):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(user_errors(), match="Inception weights and .*nope.pth does not exist"):
        main(parse_args([*tiny, "--prompts", "1", "--samples", "1", "--fid", "--inception-weights",
                         str(tmp_path / "nope.pth")]))
    torch.save({"fc.weight": torch.zeros(1008, 2048), "hook": SimpleNamespace()}, tmp_path / "pickled.pth")
    with pytest.raises(user_errors(), match="is not a plain Inception state dict") as e:
        main(parse_args([*tiny, "--fid", "--inception-weights", str(tmp_path / "pickled.pth")]))
    assert "\n" not in str(e.value)
    torch.save({"fc.weight": torch.zeros(10, 10)}, tmp_path / "other.pth")
    with pytest.raises(user_errors(), match="not torch-fidelity's Inception state dict"):
        main(parse_args([*tiny, "--fid", "--inception-weights", str(tmp_path / "other.pth")]))


def test_fid_without_torch_fidelity_is_one_line(tiny, monkeypatch, no_sampling):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import torch_fidelity -> ImportError
    with pytest.raises(user_errors(), match=r"--fid needs torch-fidelity \(pip install"):
        main(parse_args([*tiny, "--fid"]), fid_features=TinyFeatures())


def test_real_data_flags_and_folders_without_captions_are_refused(tiny, tmp_path):
    with pytest.raises(user_errors(), match="--named is for the Shapes world"):
        parse_args([*tiny, "--dataset", "folder", "--data-path", str(tmp_path), "--named", "all"])
    with pytest.raises(user_errors(), match="--data-path is for --dataset folder or coco"):
        parse_args([*tiny, "--data-path", str(tmp_path)])
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(user_errors(), match="has a caption beside it: .*a.txt"):
        main(parse_args([*tiny, "--dataset", "folder", "--data-path", str(tmp_path)]))
    with pytest.raises(user_errors(), match="--dataset coco needs --coco-annotations"):
        main(parse_args([*tiny, "--dataset", "coco", "--data-path", str(tmp_path)]))


# --- guidance needs a trained null condition ------------------------------------------------------------

def test_cfg_scale_on_a_gpt_without_a_trained_null_condition_is_refused_before_sampling(tiny, tmp_path,
                                                                                       no_sampling):
    torch.manual_seed(0)
    gpt = tiny_gpt(null_cond_trained=False)  # as models.convert_gpt marks a CLIP-GEN import
    torch.save({"kind": "gpt", "config": gpt.cfg.to_dict(), "model": gpt.state_dict()}, tmp_path / "gpt.pt")
    args = list(tiny)
    args[args.index("--gpt") + 1] = str(tmp_path / "gpt.pt")
    with pytest.raises(user_errors(), match="null") as e:
        main(parse_args([*args, "--prompts", "1", "--samples", "1", "--cfg-scale", "2"]))
    assert "\n" not in str(e.value)
    with pytest.raises(AssertionError, match="sampled"):  # guidance 1 is what this GPT can do: it samples
        main(parse_args([*args, "--prompts", "1", "--samples", "1", "--cfg-scale", "1"]))


@pytest.mark.slow
def test_inception_fid_reads_the_weights_file_given(tiny, folder, tmp_path, monkeypatch, capsys):
    """--inception-weights reaches torch-fidelity's Inception: random weights of its layout, saved as a plain
    state dict, give a finite FID and no download (the real file is ~95 MB and cannot be fetched here)."""
    import socket
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(inception.state_dict(), tmp_path / INCEPTION_FILE)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("tried to download"))
    root, _ = folder
    out = tmp_path / "r.json"
    main(parse_args([*tiny, "--dataset", "folder", "--data-path", str(root), "--samples", "2", "--fid",
                     "--inception-weights", str(tmp_path / INCEPTION_FILE), "--json", str(out)]))
    res = json.loads(out.read_text())
    assert res["fid_features"] == "inception" and res["fid"] == res["fid"] and res["fid"] >= 0
    assert "FID (Inception) to 5 real images" in capsys.readouterr().out
