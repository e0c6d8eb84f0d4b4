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


# --- the scenes world (--world scenes) -------------------------------------------------------------------

from datasets import scenes  # noqa: E402
from evaluation import scenes_eval  # noqa: E402
from evaluation.scenes_judge import CATEGORIES, find_objects  # noqa: E402
from evaluation.scenes_judge import right as scene_right  # noqa: E402


def _expected_desc(p) -> str:
    """The description a prompt's query stands for, written here from the query alone."""
    q = p.query
    if q.category == "position":
        return scenes.describe_relation(q.kinds[0], q.relation, q.kinds[1])
    return scenes.describe_groups([(c, s, q.count) for c, s in q.kinds])


def test_scenes_prompts_say_what_the_judge_checks_in_every_wording():
    prompts = scenes_eval.make_prompts(100)
    assert prompts == scenes_eval.make_prompts(100)  # a fixed seed
    assert [p.text for p in scenes_eval.make_prompts(5, seed=1)] != [p.text for p in prompts[:5]]
    for c in CATEGORIES:
        mine = [p for p in prompts if p.category == c]
        assert len(mine) == 100
        for i, p in enumerate(mine):
            assert p.text == scenes.apply_template(_expected_desc(p), i % len(scenes.TEMPLATES)), p
        assert len({p.text for p in mine}) > 50, c  # varied (two objects: 12 ordered shape pairs x 7 wordings)
    q = [p.query for p in prompts]
    assert {x.count for x in q if x.category == "counting"} == {2, 3, 4}
    assert {x.relation for x in q if x.category == "position"} == set(scenes.RELATIONS)
    assert all(x.kinds[0][1] != x.kinds[1][1] for x in q if x.category in ("two_objects", "colour_attribution"))
    assert all(x.kinds[0][0] != x.kinds[1][0] for x in q if x.category == "colour_attribution")
    assert all(x.kinds[0] != x.kinds[1] for x in q if x.category == "position")


def test_scenes_prompts_matching_renders_pass_and_hard_negatives_fail():
    negatives = {"single": ["other shape", "other colour"], "two_objects": ["other shape"],
                 "colour_attribution": ["swapped colours"], "position": ["mirrored relation"]}
    for p in scenes_eval.make_prompts(25, seed=3):
        assert scene_right(p.query, find_objects(scenes.render_scene(p.scene))), p
        names = [n for n, _ in p.negatives]
        if p.category == "counting":
            assert names == ["one fewer", "one more"][:1 + (p.query.count < scenes.MAX_OBJECTS)]
        else:
            assert names == negatives[p.category]
        cells = {(o.row, o.col) for o in p.scene}
        for name, objs in p.negatives:
            assert not scene_right(p.query, find_objects(scenes.render_scene(objs))), (p, name)
            got = {(o.row, o.col) for o in objs}
            # Only the named thing changes: the same cells (one fewer: a subset; one more: one cell added).
            assert got < cells if name == "one fewer" else got > cells if name == "one more" else got == cells
            assert len(objs) == len(p.scene) + {"one fewer": -1, "one more": 1}.get(name, 0)


class BagOfWordsCLIP:
    """A CLIP that sees which colours and which shapes there are, and nothing of counts, binding or
    places: image -> multi-hot of the colours and shapes the judge finds; text -> of the words it names.
    Padded to `dim`, unit norm (all zero for a blank image)."""

    def __init__(self, dim: int = 32):
        self.dim, self.device, self.embed_dim = dim, torch.device("cpu"), dim

    def to(self, *_):
        return self

    def _vec(self, colours, kinds) -> torch.Tensor:
        v = torch.zeros(self.dim)
        for c in colours:
            v[c] = 1
        for s in kinds:
            v[len(shapes.COLORS) + s] = 1
        return torch.nn.functional.normalize(v, dim=0)

    def encode_image(self, images):
        found = [find_objects(x) for x in images]
        return torch.stack([self._vec({o.color for o in f}, {o.shape for o in f}) for f in found])

    def encode_text(self, texts):
        words = [t.replace(",", "").split() for t in texts]
        return torch.stack([self._vec({i for i, (n, _) in enumerate(shapes.COLORS) if n in w},
                                      {i for i, s in enumerate(shapes.SHAPES) if s in w or s + "s" in w})
                            for w in words])


def test_clip_alone_on_a_clip_blind_to_counts_binding_and_places(tmp_path, monkeypatch, capsys):
    """--clip-only with a CLIP whose answer is known: it tells a red circle from a red square or a blue
    circle, and a circle and triangle from a circle and square, but its embeddings of a count off by one,
    swapped colours and a mirrored relation equal the match's: a tie, not 'above', so those categories
    score 0. No VQGAN or GPT is loaded."""
    import models.clip

    monkeypatch.setattr(models.clip, "load_clip", lambda *a, **k: BagOfWordsCLIP())
    monkeypatch.setattr(TextToImage, "from_paths", lambda *a, **k: pytest.fail("loaded the GPT"))
    out = tmp_path / "a.json"
    main(parse_args(["--world", "scenes", "--clip-only", "--clip", "fake", "--prompts", "12", "--device", "cpu",
                     "--json", str(out)]))
    a = json.loads(out.read_text())["clip_alone"]
    assert a["single"] == {"all": 1.0, "other shape": 1.0, "other colour": 1.0}
    assert a["two_objects"] == {"all": 1.0, "other shape": 1.0}
    assert a["counting"] == {"all": 0.0, "one fewer": 0.0, "one more": 0.0}
    assert a["colour_attribution"] == {"all": 0.0, "swapped colours": 0.0}
    assert a["position"] == {"all": 0.0, "mirrored relation": 0.0}
    assert a["overall"] == pytest.approx(0.4)
    text = capsys.readouterr().out
    assert "| share of prompts | 100.0% | 100.0% | 0.0% | 0.0% | 0.0% | 40.0% |" in text


def test_scenes_evaluate_end_to_end_with_tiny_models(tiny, tmp_path, capsys):
    out = tmp_path / "s.json"
    main(parse_args([*tiny, "--world", "scenes", "--prompts", "2", "--samples", "3", "--json", str(out)]))
    r = json.loads(out.read_text())
    assert r["world"] == "scenes" and r["prompts_per_category"] == 2 and r["samples_per_prompt"] == 3
    for key, n in (("raw", 6), ("reranked", 2)):  # shares of 2 x 3 raw samples and of 2 kept ones per category
        assert set(r[key]) == {*CATEGORIES, "overall"}
        assert all(abs(r[key][c] * n - round(r[key][c] * n)) < 1e-9 for c in CATEGORIES), r[key]
        assert r[key]["overall"] == pytest.approx(sum(r[key][c] for c in CATEGORIES) / 5)
    assert set(r["clip_alone"]) == {*CATEGORIES, "overall"}
    assert r["clip_score"]["reranked"] >= r["clip_score"]["raw"]
    cells = r["diversity"]["cells"]
    assert len(cells["distinct_per_prompt"]) == 10 and all(0 <= d <= 9 for d in cells["distinct_per_prompt"])
    text = capsys.readouterr().out
    assert "| raw |" in text and "| reranked (best of 3) |" in text and "(a) CLIP alone" in text


def _scenes_on(samples_for, tiny, tmp_path, monkeypatch, *flags):
    """evaluate.py --world scenes when the sampler returns samples_for(prompts) (P * S renders in prompt
    order); returns (results, the conditions the sampler got)."""
    args = parse_args([*tiny, "--world", "scenes", "--batch-size", "128", "--json", str(tmp_path / "r.json"),
                       *flags])
    prompts = scenes_eval.make_prompts(args.prompts, args.seed)
    images = samples_for(prompts)
    seen = []

    def fake_sample_conds(self, conds, **kw):
        assert len(conds) == len(images)  # every prompt's samples in one batch (--batch-size 128)
        seen.append(conds.clone())
        return images, torch.zeros(len(images), 8, 8, dtype=torch.long)

    monkeypatch.setattr(TextToImage, "sample_conds", fake_sample_conds)
    main(args)
    return json.loads((tmp_path / "r.json").read_text()), seen[0], prompts


def test_scenes_shares_and_reranking_on_samples_of_known_correctness(tiny, tmp_path, monkeypatch):
    """Each prompt's 3 samples are its matching render, its first hard negative and a blank, in an order
    rotated per prompt: 1/3 of raw samples are right in every category; re-ranking keeps the sample of
    highest CLIP score against the text (computed here with the same CLIP), and the cells counted are the
    match's and the negative's."""
    blank = torch.ones(3, 64, 64)

    def order(k):
        return [(k + j) % 3 for j in range(3)]  # sample j of prompt k is item order(k)[j] of [match, neg, blank]

    def samples_for(prompts):
        out = []
        for k, p in enumerate(prompts):
            items = [*scenes_eval.render_batch([p.scene, p.negatives[0][1]]), blank]
            out += [items[i] for i in order(k)]
        return torch.stack(out)

    res, _, prompts = _scenes_on(samples_for, tiny, tmp_path, monkeypatch, "--prompts", "3", "--samples", "3")
    assert res["raw"] == {**{c: pytest.approx(1 / 3) for c in CATEGORIES}, "overall": pytest.approx(1 / 3)}
    # Why the other two thirds fail: the blank has no object; the hard negative fails as it was made to.
    third = pytest.approx(1 / 3)
    assert res["failures"] == {"single": {"objects": third, "kinds": third},
                               "two_objects": {"objects": third, "kinds": third},
                               "counting": {"objects": pytest.approx(2 / 3)},   # one fewer, and none
                               "colour_attribution": {"objects": third, "swapped": third},
                               "position": {"objects": third, "relation": third}}
    pipe = TextToImage.from_paths(*(tiny[tiny.index(f"--{k}") + 1] for k in ("vqgan", "gpt", "clip")), device="cpu")
    images = samples_for(prompts)
    scores = (pipe.clip.encode_image(images).view(len(prompts), 3, -1)
              * pipe.clip.encode_text([p.text for p in prompts])[:, None]).sum(-1)      # (P, 3)
    kept_right = [order(k)[int(scores[k].argmax())] == 0 for k in range(len(prompts))]
    worst_right = [order(k)[int(scores[k].argmin())] == 0 for k in range(len(prompts))]
    assert kept_right != worst_right  # the samples tell the best-scoring pick from the worst
    for i, c in enumerate(CATEGORIES):
        assert res["reranked"][c] == pytest.approx(sum(kept_right[3 * i:3 * i + 3]) / 3), c
    assert res["reranked"]["overall"] == pytest.approx(sum(kept_right) / len(prompts))
    assert res["clip_score"]["raw"] == pytest.approx(float(scores.mean()), abs=1e-5)
    assert res["clip_score"]["reranked"] == pytest.approx(float(scores.max(1).values.mean()), abs=1e-5)
    expected_cells = [len({(o.row, o.col) for o in (*p.scene, *p.negatives[0][1])}) for p in prompts]
    assert res["diversity"]["cells"]["distinct_per_prompt"] == expected_cells


@pytest.mark.parametrize("source", ["text", "image"])
def test_scenes_condition_is_the_text_or_the_matching_renders_image_embedding(source, tiny, tmp_path, monkeypatch):
    from models.clip import load_clip

    res, conds, prompts = _scenes_on(lambda ps: torch.ones(len(ps) * 2, 3, 64, 64), tiny, tmp_path, monkeypatch,
                                     "--prompts", "1", "--samples", "2", "--cond-source", source)
    clip = load_clip(tiny[tiny.index("--clip") + 1])
    want = (clip.encode_text([p.text for p in prompts]) if source == "text"
            else clip.encode_image(scenes_eval.render_batch([p.scene for p in prompts])))
    assert torch.allclose(conds, want.repeat_interleave(2, 0), atol=1e-5)
    assert res["cond_source"] == source and res["raw"]["overall"] == 0.0  # blank samples are never right


def test_scenes_flags_are_checked_in_one_line(tiny, tmp_path):
    for flags, msg in ((["--named", "all"], "--named is not for --world scenes"),
                       (["--fd-real", "4"], "--fd-real is not for --world scenes"),
                       (["--fid"], "--fid is not for --world scenes"),
                       (["--dataset", "folder", "--data-path", str(tmp_path)], "--world scenes measures"),
                       (["--clip-only", "--cond-source", "image"], "--clip-only measures CLIP alone"),
                       (["--prompts", "0"], "--prompts must be at least 1"),
                       (["--samples", "0"], "--samples must be at least 1")):
        with pytest.raises(user_errors(), match=msg):
            parse_args([*tiny, "--world", "scenes", *flags])
    with pytest.raises(user_errors(), match="--clip-only is for --world scenes"):
        parse_args([*tiny, "--clip-only"])
    with pytest.raises(user_errors(), match="--vqgan and --gpt are required"):
        parse_args(["--clip", "c", "--world", "scenes"])
    assert parse_args(["--clip", "c", "--world", "scenes", "--clip-only"]).prompts == 100  # per category
    assert parse_args([*tiny]).prompts == 200


def test_a_flag_error_is_one_line_from_the_command_line(tiny):
    import subprocess

    from tests.conftest import REPO
    from tests.test_train_vqgan import _env

    r = subprocess.run([sys.executable, "evaluate.py", *tiny, "--world", "scenes", "--prompts", "0"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == "error: --prompts must be at least 1\n"
