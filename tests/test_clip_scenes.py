"""train_clip.py on the scenes world: NegCLIP-style hard negatives. Each caption's hard negative differs from
it in exactly one binding and is false of its scene; the loss adds them to the image -> text direction only;
a short run with --hard-negatives feeds one per image into that loss."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import train_clip
from datasets.scenes import (HARD_NEGATIVES, MIRROR, ScenesDataset, caption_plan, hard_negative_plan, place,
                             word_plan)
from datasets.scenes import render_scene as place_render
from tests.test_scenes import parse_caption


def holds(parsed, objects) -> bool:
    """Whether a parsed caption (tests.test_scenes.parse_caption's form) is true of the scene."""
    if parsed[0] == "groups":
        kinds = Counter(o.kind for o in objects)
        return {(c, s): n for c, s, n in parsed[1]} == dict(kinds)
    _, a, rel, b = parsed
    rel_true = {"left of": lambda p, q: p.col < q.col, "right of": lambda p, q: p.col > q.col,
                "above": lambda p, q: p.row < q.row, "below": lambda p, q: p.row > q.row}[rel]
    return len(objects) == 2 and any(p.kind == a and q.kind == b and rel_true(p, q)
                                     for p in objects for q in objects if p is not q)


def changed_binding(pos, neg) -> str | None:
    """The HARD_NEGATIVES name of the one change that turns parsed caption pos into neg, None if it is not
    exactly one such change."""
    if pos[0] == neg[0] == "relation":
        (_, a, rel, b), (_, na, nrel, nb) = pos, neg
        if (na, nrel, nb) in ((a, MIRROR[rel], b), (b, rel, a)):
            return "mirrored relation"
        if nrel != rel:
            return None
        sides = [(x, y) for x, y in ((a, na), (b, nb)) if x != y]
    elif pos[0] == neg[0] == "groups" and len(pos[1]) == len(neg[1]):
        sides = [(x, y) for x, y in zip(pos[1], neg[1]) if x != y]
        if len(sides) == 1 and sides[0][0][:2] == sides[0][1][:2]:
            return "count" if abs(sides[0][0][2] - sides[0][1][2]) == 1 else None
        if any(x[2] != y[2] for x, y in sides):  # besides a count, counts stay
            return None
    else:
        return None
    if len(sides) == 1:
        (c, s, *_), (nc, ns, *_) = sides[0]
        return "other shape" if c == nc and s != ns else "other colour" if s == ns and c != nc else None
    if len(sides) == 2:
        ((c1, s1, *_), (d1, t1, *_)), ((c2, s2, *_), (d2, t2, *_)) = sides
        if s1 == t1 and s2 == t2 and (d1, d2) == (c2, c1) and c1 != c2:
            return "swapped colours"
    return None


def test_each_hard_negative_changes_exactly_its_binding_and_is_false_of_the_scene():
    ds = ScenesDataset("captioned-train", 400)
    names = Counter()
    for i in range(400):
        objects = ds.scene(i)
        caption = ds.caption(i, objects)
        plan = caption_plan(objects, np.random.default_rng([ds.split_seed, i, 1]))
        assert word_plan(plan) == caption  # the plan is the caption's, worded the same way
        template, pos = parse_caption(caption)
        assert holds(pos, objects), caption
        # the trainer's (ScenesDataset.hard_negative_plan), and more draws of the same function
        drawn = [ds.hard_negative_plan(i, objects)] + [hard_negative_plan(plan, np.random.default_rng([i, k]))
                                                       for k in range(4)]
        for name, neg_plan in drawn:
            negative = word_plan(neg_plan)
            neg_template, neg = parse_caption(negative)
            assert neg_template == template, (caption, negative)
            assert changed_binding(pos, neg) == name, (caption, negative, name)
            assert not holds(neg, objects), (caption, negative, objects)
            if neg[0] == "groups":  # still a caption of this world: one group per kind, 1 to 4 objects
                assert len({(c, s) for c, s, _ in neg[1]}) == len(neg[1])
                assert 1 <= sum(n for _, _, n in neg[1]) <= 4
            names[name] += 1
            # the codes the trainer masks with: the caption's meaning is true of its scene, the negative's not
            assert train_clip.statement_code(neg_plan[1]) not in train_clip.true_codes(objects).tolist()
        assert train_clip.statement_code(plan[1]) in train_clip.true_codes(objects).tolist()
    assert set(names) == set(HARD_NEGATIVES), names


def test_relation_captions_are_mirrored_in_either_wording_or_changed_otherwise():
    rng = np.random.default_rng(0)
    plan = (0, ("relation", (0, 0), "left of", (5, 1)))  # a red circle to the left of a blue square
    mirrors = {"a red circle to the right of a blue square", "a blue square to the left of a red circle"}
    assert {word_plan(hard_negative_plan(plan, rng)[1]) for _ in range(100)} == mirrors  # p_mirror = 1
    said = Counter(hard_negative_plan(plan, rng, p_mirror=0.0)[0] for _ in range(300))
    assert set(said) == {"mirrored relation", "swapped colours", "other shape", "other colour"}
    swapped = {word_plan(hard_negative_plan(plan, rng, p_mirror=0.0)[1]) for _ in range(300)}
    assert "a blue circle to the left of a red square" in swapped and word_plan(plan) not in swapped


def test_statement_codes_say_when_a_hard_negative_describes_another_scene():
    rng = np.random.default_rng(0)
    red_square = place([(0, 1, 1, 1)], rng)
    two = place([(0, 0, 0, 0), (5, 1, 0, 2)], rng)  # red circle top left, blue square top right
    code = train_clip.statement_code
    assert code(("groups", [(0, 1, 1)])) in train_clip.true_codes(red_square).tolist()  # "a red square"
    assert code(("groups", [(0, 1, 2)])) not in train_clip.true_codes(red_square).tolist()
    truths = train_clip.true_codes(two).tolist()
    for desc in (("groups", [(5, 1, 1), (0, 0, 1)]), ("relation", (0, 0), "left of", (5, 1)),
                 ("relation", (5, 1), "right of", (0, 0))):
        assert code(desc) in truths
    for desc in (("relation", (0, 0), "right of", (5, 1)), ("relation", (0, 0), "above", (5, 1)),
                 ("relation", (5, 1), "left of", (0, 0)), ("groups", [(0, 0, 1)])):
        assert code(desc) not in truths


# ---- the loss ------------------------------------------------------------------------------------------

def test_loss_with_a_hard_negative_by_hand():
    img = torch.eye(2)            # two images, unit norm
    txt = torch.eye(2)            # their captions, each aligned with its image
    hard = torch.tensor([[1.0, 0.0]])  # one hard negative, as close to image 0 as its caption is
    e = math.e
    # image -> text, scale 1: row 0 logits [1, 0, 1], row 1 [0, 1, 0]; text -> image: [1, 0], [0, 1]
    i2t = ((math.log(2 * e + 1) - 1) + (math.log(e + 2) - 1)) / 2
    t2i = math.log(e + 1) - 1
    got = train_clip.contrastive_loss(img, txt, torch.tensor(1.0), hard)
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert train_clip.contrastive_loss(img, txt, torch.tensor(1.0)).item() == pytest.approx(t2i, abs=1e-6)


def test_hard_negatives_enter_only_the_image_to_text_direction():
    torch.manual_seed(0)
    img, txt, hard = (F.normalize(torch.randn(n, 8), dim=-1) for n in (6, 6, 3))
    scale = torch.tensor(7.0)
    plain = train_clip.contrastive_loss(img, txt, scale)
    assert plain.item() == pytest.approx(ClipLoss()(img, txt, scale).item(), abs=1e-6)  # open_clip's, without
    with_hard = train_clip.contrastive_loss(img, txt, scale, hard)
    # Only each image's partition function over texts grows, by its terms for the hard negatives:
    # loss rises by half the mean of log(sum_j e^{s i.t_j} + sum_h e^{s i.h}) - log(sum_j e^{s i.t_j}).
    pos_terms = torch.logsumexp(scale * img @ txt.T, dim=1)
    all_terms = torch.logsumexp(torch.cat([scale * img @ txt.T, scale * img @ hard.T], 1), dim=1)
    assert (with_hard - plain).item() == pytest.approx(((all_terms - pos_terms).mean() / 2).item(), abs=1e-5)


def test_a_hard_negative_true_of_an_image_is_left_out_of_its_row():
    img, txt = torch.eye(2), torch.eye(2)
    hard = torch.eye(2)  # hard negative h as close to image h as its caption
    one = torch.tensor(1.0)
    true_codes = torch.tensor([[7, -1], [8, 9]])   # image 1's statements include hard negative 0's (code 9)
    hard_codes = torch.tensor([9, 5])
    masked = train_clip.contrastive_loss(img, txt, one, hard, 1, true_codes, hard_codes)
    e = math.e
    # image 0 keeps both: logits [1, 0, 1, 0]; image 1 drops hard 0: [0, 1, (-inf), 1]; text -> image as before
    i2t = ((math.log(2 * e + 2) - 1) + (math.log(2 * e + 1) - 1)) / 2
    t2i = math.log(e + 1) - 1
    assert masked.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    unmasked = train_clip.contrastive_loss(img, txt, one, hard)
    assert unmasked.item() == pytest.approx(((math.log(2 * e + 2) - 1) + t2i) / 2, abs=1e-6)


def test_hard_negative_images_enter_only_the_text_to_image_direction_and_only_where_usable():
    img, txt = torch.eye(3), torch.eye(3)
    hard_img = torch.eye(3)  # hard image h as close to text h as h's own image
    one = torch.tensor(1.0)
    caption_codes = torch.tensor([4, 5, 6])
    # hard image 0: a mirrored scene (codes 14, 15); 1: none (-1 row); 2: true of text 0's caption (code 4)
    hard_img_codes = torch.tensor([[14, 15], [-1, -1], [4, -1]])
    got = train_clip.contrastive_loss(img, txt, one, hard_img=hard_img, hard_img_codes=hard_img_codes,
                                      caption_codes=caption_codes)
    e = math.e
    i2t = math.log(e + 2) - 1                      # unchanged: [1, 0, 0] per row
    # text 0: images [1, 0, 0] + hard [1, -inf (none), -inf (true of it)]; text 1: + hard [0, -inf, 0];
    # text 2: + hard [0, -inf, 1]: hard image 2 is a negative for text 2 (its code is not text 2's)
    t2i = ((math.log(2 * e + 2) - 1) + (math.log(e + 4) - 1) + (math.log(2 * e + 3) - 1)) / 3
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    none = train_clip.contrastive_loss(img, txt, one, hard_img=hard_img, hard_img_codes=torch.full((3, 2), -1),
                                       caption_codes=caption_codes)
    assert none.item() == pytest.approx(train_clip.contrastive_loss(img, txt, one).item(), abs=1e-6)


def test_mirrored_scenes_trade_the_kinds_and_reverse_every_relation():
    split = ScenesDataset("captioned-train", 400)
    index = next(i for i in range(400) if split.caption_plan(i)[1][0] == "relation")
    a, b = split.scene(index)
    m = train_clip.mirrored([a, b])
    assert [o.kind for o in m] == [b.kind, a.kind]
    assert [(o.row, o.col, o.side, o.cx, o.cy) for o in m] == [(o.row, o.col, o.side, o.cx, o.cy) for o in (a, b)]
    assert holds(parse_caption(split.caption(index))[1], [a, b])
    assert not holds(parse_caption(split.caption(index))[1], m)


def test_hard_negative_images_are_the_mirrored_renders_of_relation_items_only():
    split = ScenesDataset("captioned-train", 400)
    ds = train_clip.WithHardNegatives(split, images=True)
    relation = next(i for i in range(400) if split.caption_plan(i)[1][0] == "relation")
    groups = next(i for i in range(400) if split.caption_plan(i)[1][0] == "groups")
    item = ds[relation]
    objects = split.scene(relation)
    assert torch.equal(item["hard_image"], split.transform(place_render(train_clip.mirrored(objects))))
    assert not torch.equal(item["hard_image"], item["image"])
    assert torch.equal(item["hard_image_codes"], train_clip.true_codes(train_clip.mirrored(objects)))
    assert item["caption_code"] == train_clip.statement_code(split.caption_plan(relation)[1])
    assert item["caption_code"] not in item["hard_image_codes"].tolist()
    other = ds[groups]
    assert (other["hard_image_codes"] == -1).all() and other["hard_image"].shape == other["image"].shape
    assert "hard_image" not in train_clip.WithHardNegatives(split)[relation]


# ---- train_clip.py -----------------------------------------------------------------------------------------

def test_hard_negatives_flag_defaults_and_misuse(capsys):
    assert train_clip.parse_args(["--dataset", "scenes"]).hard_negatives is False  # the shapes preset
    assert train_clip.parse_args(["--dataset", "scenes", "--hard-negatives"]).hard_negatives is True
    with pytest.raises(SystemExit) as e:  # one `error:` line, not a UsageError traceback outside engine.cli.run
        train_clip.parse_args(["--hard-negatives"])
    assert e.value.code == 2 and "--hard-negatives is for --dataset scenes" in capsys.readouterr().err


def test_two_step_tiny_run_feeds_one_hard_negative_per_image(tmp_path, monkeypatch):
    seen = []
    loss = train_clip.contrastive_loss

    def spy(img, txt, scale, hard=None, world_size=1, true_codes=None, hard_codes=None):
        seen.append((img.shape, txt.shape, None if hard is None else hard.shape,
                     hard is not None and hard.requires_grad, true_codes.shape, hard_codes.shape))
        return loss(img, txt, scale, hard, world_size, true_codes, hard_codes)

    monkeypatch.setattr(train_clip, "contrastive_loss", spy)
    args = train_clip.parse_args(["--preset", "tiny", "--dataset", "scenes", "--hard-negatives", "--max-steps", "2",
                                  "--batch-size", "4", "--val-every", "2", "--shapes-val-size", "8",
                                  "--num-workers", "0", "--no-tensorboard", "--device", "cpu",
                                  "--out-dir", str(tmp_path)])
    train_clip.main(args)
    assert seen == [((4, 32), (4, 32), (4, 32), True, (4, train_clip.MAX_TRUE), (4,))] * 2
    assert (tmp_path / "latest.pt").exists()


def test_a_tiny_run_with_hard_negative_images_feeds_a_mirrored_image_per_item(tmp_path, monkeypatch):
    seen = []
    loss = train_clip.contrastive_loss

    def spy(img, txt, scale, hard=None, world_size=1, true_codes=None, hard_codes=None, hard_img=None,
            hard_img_codes=None, caption_codes=None):
        seen.append((img.shape, hard_img.shape, hard_img.requires_grad, hard_img_codes.shape, caption_codes.shape,
                     int((hard_img_codes >= 0).any(1).sum())))
        return loss(img, txt, scale, hard, world_size, true_codes, hard_codes, hard_img, hard_img_codes,
                    caption_codes)

    monkeypatch.setattr(train_clip, "contrastive_loss", spy)
    args = train_clip.parse_args(["--preset", "tiny", "--dataset", "scenes", "--hard-negatives",
                                  "--hard-negative-images", "--relation-share", "1", "--max-steps", "2",
                                  "--batch-size", "4", "--val-every", "2", "--shapes-val-size", "8",
                                  "--num-workers", "0", "--no-tensorboard", "--device", "cpu",
                                  "--out-dir", str(tmp_path)])
    train_clip.main(args)
    assert seen == [((4, 32), (4, 32), True, (4, train_clip.MAX_TRUE), (4,), 4)] * 2


def _says_relation(ds, item) -> bool:
    return ds.caption_plan(item["index"])[1][0] == "relation"


def test_relation_share_draws_that_share_from_the_relation_captions_and_is_a_function_of_the_key():
    split = ScenesDataset("captioned-train", 2000)
    natural = np.mean([split.caption_plan(i)[1][0] == "relation" for i in range(2000)])
    assert 0.06 < natural < 0.14  # the world's: two different objects (~0.22) x P_RELATION 0.5
    half = train_clip.RelationShare(split, 0.5)
    assert len(half) == 2000 and all(_says_relation(split, split[i]) for i in half.relations)
    assert len(half.relations) == round(natural * 2000)
    drawn = [half[i] for i in range(300)]
    share = np.mean([_says_relation(split, d) for d in drawn])
    assert 0.47 < share < 0.65  # 0.5 drawn from the relations, plus the natural ~10% of the other half
    assert 0.5 * 300 * 0.8 < sum(d["index"] != i for i, d in enumerate(drawn)) < 0.5 * 300 * 1.2
    again = [half[i]["index"] for i in range(300)]
    assert [d["index"] for d in drawn] == again
    assert [d["caption"] for d in drawn] == [split.caption(d["index"]) for d in drawn]  # items stay whole
    assert torch.equal(drawn[7]["image"], split[drawn[7]["index"]]["image"])
    other_epoch = [half[(i, 1)]["index"] for i in range(100)]  # a key's seed changes which relation item
    assert other_epoch != [d["index"] for d in drawn[:100]]
    none, every = train_clip.RelationShare(split, 0.0), train_clip.RelationShare(split, 1.0)
    assert [none[i]["index"] for i in range(50)] == list(range(50))
    assert all(_says_relation(split, every[i]) for i in range(50))


def test_relation_share_feeds_the_hard_negatives_of_the_item_it_draws():
    split = ScenesDataset("captioned-train", 500)
    item = train_clip.WithHardNegatives(train_clip.RelationShare(split, 1.0))[3]
    plan = split.caption_plan(item["index"])
    assert plan[1][0] == "relation" and item["caption"] == word_plan(plan)
    _, negative = split.hard_negative_plan(item["index"])
    assert item["hard_negative"] == word_plan(negative)


def test_relation_share_and_hard_negative_images_flags(capsys):
    assert train_clip.parse_args(["--preset", "scenes"]).relation_share is None
    assert train_clip.parse_args(["--preset", "scenes"]).hard_negative_images is False
    assert train_clip.parse_args(["--preset", "scenes", "--hard-negative-images"]).hard_negative_images is True
    assert train_clip.parse_args(["--preset", "scenes", "--relation-share", "0.5"]).relation_share == 0.5
    for argv, message in ((["--relation-share", "0.5"], "--relation-share is for --dataset scenes"),
                          (["--dataset", "scenes", "--relation-share", "1.5"], "--relation-share"),
                          (["--dataset", "scenes", "--hard-negative-images"], "needs --hard-negatives")):
        with pytest.raises(SystemExit) as e:
            train_clip.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
