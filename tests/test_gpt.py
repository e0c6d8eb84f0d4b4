"""The stage-2 GPT (models/gpt.py) and its loaders (models/convert_gpt.py): causality, KV cache, guidance,
sampling filters, optimiser groups, CLIP-GEN compatibility and checkpoint errors."""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import CheckpointError
from models.convert_gpt import clipgen_gpt_config, convert_clipgen_gpt, load_gpt, load_state
from models.gpt import GPT, PRESETS, GPTConfig, GuidanceError, build_gpt, draw, filter_logits
from tests.conftest import COMPAT_DIR

V, N, D = 32, 12, 16  # vocab, tokens per image, cond width of the tiny test models


def tiny(n_prefix=1, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, n_tokens=N, n_layer=2, n_head=4, n_embd=32, cond_dim=D, n_prefix=n_prefix,
                    **kw)
    return GPT(cfg).eval()


def sharp(n_prefix=1) -> GPT:
    """A tiny model with large weights: at the usual 0.02 init the logits are nearly uniform and depend
    little on the condition, so the same random draws give the same tokens and sampling tests prove little."""
    m = tiny(n_prefix)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return m


def data(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, N), generator=g), torch.randn(B, D, generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- forward

def test_config_round_trip_and_presets():
    cfg = replace(PRESETS["tiny"], vocab_size=7, n_tokens=4, block_size=9)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    cfg = replace(cfg, null_cond_trained=False, origin="clipgen")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg and cfg != replace(cfg, null_cond_trained=True)
    with pytest.raises(ValueError, match="origin"):
        replace(cfg, origin="elsewhere")
    assert (PRESETS["gpt2-medium"].n_layer, PRESETS["gpt2-medium"].n_embd, PRESETS["gpt2-medium"].n_head) == \
        (24, 1024, 16)
    m = build_gpt("tiny", vocab_size=V, n_tokens=N, cond_dim=D, n_layer=1)
    assert (m.cfg.n_layer, m.cfg.n_embd, m.pos_emb.shape[1]) == (1, 256, N)  # 1 prefix + N - 1 fed tokens


def test_training_convention_shapes_and_loss():
    m = tiny()
    tokens, cond = data()
    logits = m(tokens, cond)
    assert logits.shape == (3, N, V)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5  # near uniform at init
    assert m(tokens[:, :1], cond).shape == (3, 1, V)  # only the prefix is fed


@pytest.mark.parametrize("n_prefix", [1, 2])
def test_causal(n_prefix):
    m = tiny(n_prefix)
    tokens, cond = data()
    ref = m(tokens, cond)
    j = 5
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 1) % V
    out = m(changed, cond)
    # logits[:, i] depends on tokens[:, :i] only: positions <= j are blind to token j, position j+1 sees it.
    torch.testing.assert_close(out[:, : j + 1], ref[:, : j + 1], rtol=0, atol=0)
    assert not torch.allclose(out[:, j + 1], ref[:, j + 1])


@pytest.mark.parametrize("n_prefix", [1, 2])
def test_kv_cache_matches_uncached(n_prefix):
    m = tiny(n_prefix)
    tokens, cond = data()
    ref = m(tokens, cond)                                      # (B, N, V)
    # Token by token: the first call feeds only the prefix.
    cache = m.new_kv_cache(3)
    steps = [m(tokens[:, :0], cond, kv_cache=cache)]
    steps += [m(tokens[:, i : i + 1], None, kv_cache=cache) for i in range(N - 1)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=0, atol=1e-5)
    assert cache.length == n_prefix + N - 1
    # Chunks: prefix + 3 tokens, then 4 at once (offset causal mask), then the rest one by one.
    cache = m.new_kv_cache(3)
    steps = [m(tokens[:, :3], cond, kv_cache=cache), m(tokens[:, 3:7], None, kv_cache=cache)]
    steps += [m(tokens[:, i : i + 1], None, kv_cache=cache) for i in range(7, N - 1)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=0, atol=1e-5)


def test_cond_drop_uses_null_prefix():
    m = tiny(2)
    with torch.no_grad():
        m.null_prefix.normal_()
    tokens, cond = data()
    drop = torch.ones(3, dtype=torch.bool)
    a = m(tokens, cond, drop)
    b = m(tokens, torch.randn_like(cond) * 10, drop)
    torch.testing.assert_close(a, b, rtol=0, atol=0)            # the condition is ignored when dropped
    assert not torch.allclose(a, m(tokens, cond))
    # ... and replaced by the null prefix: zero the projection's weight, set its bias to the null prefix.
    with torch.no_grad():
        m.cond_proj.weight.zero_()
        m.cond_proj.bias.copy_(m.null_prefix.flatten())
    torch.testing.assert_close(m(tokens, cond), a, rtol=0, atol=1e-6)
    mixed = m(tokens, cond, torch.tensor([True, False, True]))
    torch.testing.assert_close(mixed, a, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- sampling

def _reference_sample(m, cond, seed, top_k=None, cfg_scale=1.0, temperature=1.0, top_p=None):
    """Sampling with uncached forwards, guidance from separate conditional and null passes: the definition
    the cached, batched sampler must meet."""
    g, B = gen(seed), cond.shape[0]
    out = torch.zeros(B, N, dtype=torch.long)
    for i in range(N):
        logits = m(out[:, : i + 1], cond)[:, i]
        if cfg_scale != 1.0:
            null = m(out[:, : i + 1], cond, torch.ones(B, dtype=torch.bool))[:, i]
            logits = null + cfg_scale * (logits - null)
        out[:, i] = draw(logits / temperature, top_k, top_p, g)[:, 0]
    return out


def test_sample_equals_uncached_conditional_sampling_and_is_deterministic():
    m = sharp()
    _, cond = data()
    a = m.sample(cond, generator=gen(5))
    assert a.shape == (3, N) and a.dtype == torch.long
    torch.testing.assert_close(a, _reference_sample(m, cond, 5), rtol=0, atol=0)
    torch.testing.assert_close(m.sample(cond, generator=gen(5)), a, rtol=0, atol=0)
    assert not torch.equal(m.sample(cond, generator=gen(6)), a)


@pytest.mark.parametrize("kw", [dict(temperature=0.5), dict(temperature=2.0, top_k=5),
                                dict(top_p=0.8, cfg_scale=2.0)])
def test_sample_filters_match_reference(kw):
    m = sharp()
    _, cond = data()
    torch.testing.assert_close(m.sample(cond, generator=gen(7), **kw), _reference_sample(m, cond, 7, **kw),
                               rtol=0, atol=0)


def test_cfg_scale_one_skips_null_rows_and_guidance_changes_samples():
    m = sharp()
    _, cond = data()
    rows = []
    hook = m.tok_emb.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    plain = m.sample(cond, generator=gen(3))
    assert set(rows) == {3}
    rows.clear()
    torch.testing.assert_close(m.sample(cond, cfg_scale=1.0, generator=gen(3)), plain, rtol=0, atol=0)
    guided = m.sample(cond, cfg_scale=3.0, generator=gen(3))
    assert set(rows) == {3, 6}                                 # one batched forward of cond + null rows
    hook.remove()
    assert not torch.equal(guided, plain)
    # Guided logits are null + s * (cond - null); s = 0 samples from the null condition alone.
    for scale in (3.0, 0.0):
        torch.testing.assert_close(m.sample(cond, cfg_scale=scale, generator=gen(4)),
                                   _reference_sample(m, cond, 4, cfg_scale=scale), rtol=0, atol=0)


def test_top_k_one_is_greedy():
    m = sharp()
    _, cond = data()
    greedy = m.sample(cond, top_k=1, temperature=5.0, generator=gen(0))
    torch.testing.assert_close(m.sample(cond, top_k=1, generator=gen(1)), greedy, rtol=0, atol=0)
    ref = torch.zeros(3, N, dtype=torch.long)
    for i in range(N):
        ref[:, i] = m(ref[:, : i + 1], cond)[:, i].argmax(-1)
    torch.testing.assert_close(greedy, ref, rtol=0, atol=0)


@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (None, 0.7), (4, 0.8)])
def test_draw_follows_the_filtered_distribution(top_k, top_p):
    """Drawing among the top-k candidates samples softmax(filter_logits(...)) over the whole vocabulary."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    want = F.softmax(filter_logits(logits, top_k, top_p), -1)[0]
    n = 40_000
    got = draw(logits.expand(n, -1), top_k, top_p, gen(3))[:, 0]
    freq = torch.bincount(got, minlength=12).float() / n
    assert torch.all(freq[want == 0] == 0)  # never outside the top-k / nucleus
    assert (freq - want).abs().max() < 0.01, (freq, want)


def test_filter_logits_top_k_and_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.7, 0.04, 0.2, 0.06]])
    logits = probs.log()
    inf = float("-inf")
    kept = lambda x: torch.isfinite(x)  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)).tolist() == [[False, True, False, True],
                                                             [True, False, True, False]]
    # Nucleus 0.75: the smallest set reaching 0.75 is {0.5, 0.3} in row 0 and {0.7, 0.2} in row 1.
    assert kept(filter_logits(logits, top_p=0.75)).tolist() == [[False, True, False, True],
                                                                [True, False, True, False]]
    assert kept(filter_logits(logits, top_p=0.9)[0]).tolist() == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)).sum(-1).tolist() == [1, 1]  # the top token always stays
    torch.testing.assert_close(filter_logits(logits, top_k=3, top_p=0.75)[0],
                               torch.tensor([inf, probs[0, 1].log(), inf, probs[0, 3].log()]))


def test_first_tokens_are_kept_and_continued():
    m = sharp()
    tokens, cond = data()
    out = m.sample(cond, top_k=1, first_tokens=tokens[:, :4])
    torch.testing.assert_close(out[:, :4], tokens[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 4], m(tokens[:, :5], cond)[:, 4].argmax(-1), rtol=0, atol=0)


def test_param_groups():
    m = tiny(2)
    decay, no_decay = m.param_groups(0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())       # every parameter exactly once
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"null_prefix", "pos_emb", "tok_emb.weight", "ln_f.weight", "head.bias", "blocks.0.ln_1.weight",
            "blocks.0.attn.qkv.bias"} <= nd
    assert all(n.endswith(".bias") or "ln_" in n or n in ("null_prefix", "pos_emb", "tok_emb.weight")
               for n in nd)
    assert all(names[id(p)].endswith(".weight") and p.dim() == 2 for p in decay["params"])
    assert "head.weight" in {names[id(p)] for p in decay["params"]}


# ------------------------------------------------------------------------------------------- CLIP-GEN

def test_clipgen_fixture_logits_and_greedy_tokens():
    exp = torch.load(COMPAT_DIR / "clipgen_gpt_small.expected.pt", weights_only=True)
    m = load_gpt(COMPAT_DIR / "clipgen_gpt_small.pt")
    c = exp["config"]
    assert (m.cfg.vocab_size, m.cfg.n_layer, m.cfg.n_embd, m.cfg.n_head, m.cfg.n_positions, m.cfg.cond_dim,
            m.cfg.n_tokens) == (c["vocab_size"], c["n_layer"], c["n_embed"], c["n_head"], c["block_size"],
                                c["n_cond_embed"], 16)
    with torch.no_grad():
        logits = m(exp["tokens"], exp["embed"])  # feeds tokens[:, :15] after the prefix, as the fixture did
    assert ((logits - exp["logits"]).norm() / exp["logits"].norm()).item() < 1e-5
    greedy = m.sample(exp["embed"], top_k=1, n_tokens=16)  # the cached sampler
    torch.testing.assert_close(greedy, exp["greedy_tokens"], rtol=0, atol=0)


def test_clipgen_gpt_refuses_guidance_and_samples_without():
    """CLIP-GEN never trained a null condition: the imported config says so, and guidance is refused in one
    line instead of silently mixing in the random null prefix; unguided sampling works."""
    exp = torch.load(COMPAT_DIR / "clipgen_gpt_small.expected.pt", weights_only=True)
    m = load_gpt(COMPAT_DIR / "clipgen_gpt_small.pt")
    assert (m.cfg.null_cond_trained, m.cfg.origin) == (False, "clipgen")
    with pytest.raises(GuidanceError) as e:
        m.sample(exp["embed"], cfg_scale=2.0, generator=gen(0))
    msg = str(e.value)
    assert isinstance(e.value, CheckpointError) and "\n" not in msg and "CLIP-GEN trains none" in msg, msg
    assert m.sample(exp["embed"], cfg_scale=1.0, generator=gen(0)).shape == (2, 16)


def test_clipgen_full_size_manifest_loads_strictly():
    man = json.loads((COMPAT_DIR / "full_size_key_manifests.json").read_text())["clipgen_gpt_coco"]
    sd = {k: torch.empty(s, device="meta", dtype=torch.bool if k.endswith(".mask") else torch.float32)
          for k, s in man["keys"].items()}
    cfg = clipgen_gpt_config(sd)
    got = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_tokens, cfg.cond_dim, cfg.n_positions)
    assert got == (24, 1024, 16, 16384, 256, 512, 256)
    c = man["config"]
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.cond_dim) == \
        (c["n_layer"], c["n_embed"], c["n_head"], c["vocab_size"], c["n_cond_embed"])
    with torch.device("meta"):
        model = GPT(cfg)
    converted = convert_clipgen_gpt(sd)
    assert len(converted) == len(sd) - 24                       # only the 24 mask buffers are dropped
    load_state(model, converted, assign=True)                   # strict: raises on any missing/extra key
    assert model.head.weight.shape == (16384, 1024)


def test_clipgen_unknown_key_is_refused():
    m = tiny()
    sd = {"tok_emb.weight": m.tok_emb.weight, "blocks.0.encoder.dropout.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="does not know"):
        convert_clipgen_gpt(sd)


# ------------------------------------------------------------------------------------------- load_gpt

def test_own_checkpoint_round_trip_prefers_ema(tmp_path):
    m = tiny(2)
    ema = {k: v + 1 for k, v in m.state_dict().items()}
    torch.save({"kind": "gpt", "config": m.cfg.to_dict(), "model": m.state_dict(), "ema": ema},
               tmp_path / "g.pt")
    a = load_gpt(tmp_path / "g.pt")
    assert a.cfg == m.cfg and not a.training
    torch.testing.assert_close(a.head.bias, m.head.bias + 1)
    torch.testing.assert_close(load_gpt(tmp_path / "g.pt", use_ema=False).head.bias, m.head.bias)


@pytest.mark.parametrize("conditioning,trained", [(None, True), ({"cond_drop": 0.1}, True),
                                                   ({"cond_drop": 0.0}, False)])
def test_configs_without_null_cond_trained_take_it_from_cond_drop(tmp_path, conditioning, trained):
    """Checkpoints written before the field existed still load: the run's recorded condition dropout (in
    the .pt, and in export.py's weights file) says whether the null prefix was trained; nothing recorded
    means trained. A trained one guides; an untrained one refuses guidance but samples without."""
    from export import export

    m = sharp()
    old = {k: v for k, v in m.cfg.to_dict().items() if k not in ("null_cond_trained", "origin")}
    extra = {"conditioning": {"cond": "image", **conditioning}} if conditioning else {}
    torch.save({"kind": "gpt", "config": old, "model": m.state_dict(), **extra}, tmp_path / "old.pt")
    export(tmp_path / "old.pt", tmp_path / "old.safetensors", dtype=torch.float32)
    _, cond = data()
    for name in ("old.pt", "old.safetensors"):
        g = load_gpt(tmp_path / name)
        assert (g.cfg.null_cond_trained, g.cfg.origin) == (trained, "project"), name
        if trained:
            guided = g.sample(cond, cfg_scale=3.0, generator=gen(4))
            torch.testing.assert_close(guided, _reference_sample(g, cond, 4, cfg_scale=3.0), rtol=0, atol=0)
            assert not torch.equal(guided, g.sample(cond, generator=gen(4)))
        else:
            with pytest.raises(GuidanceError, match="trained with --cond-drop 0"):
                g.sample(cond, cfg_scale=3.0)
            torch.testing.assert_close(g.sample(cond, generator=gen(4)), _reference_sample(g, cond, 4))
    # A config that has the field keeps it, whatever the recorded dropout.
    new = {**m.cfg.to_dict(), "null_cond_trained": False}
    torch.save({"kind": "gpt", "config": new, "model": m.state_dict(), "conditioning": {"cond_drop": 0.1}},
               tmp_path / "new.pt")
    assert load_gpt(tmp_path / "new.pt").cfg.null_cond_trained is False


def _one_line_error(path, match):
    with pytest.raises(CheckpointError) as e:
        load_gpt(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and match in msg
    return msg


def test_load_gpt_errors(tmp_path):
    _one_line_error(tmp_path / "missing.pt", "not found")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    _one_line_error(tmp_path / "junk.pt", "cannot read")
    torch.save({"kind": "vqgan", "config": {}, "model": {}}, tmp_path / "vq.pt")
    _one_line_error(tmp_path / "vq.pt", "'vqgan' checkpoint, not a GPT one")
    torch.save({"kind": "gpt", "model": {}}, tmp_path / "noconf.pt")
    _one_line_error(tmp_path / "noconf.pt", "without 'config'")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    _one_line_error(tmp_path / "other.pt", "not a GPT checkpoint we know")
    torch.save([1, 2], tmp_path / "list.pt")
    _one_line_error(tmp_path / "list.pt", "not a checkpoint dict")
    m = tiny()
    sd = m.state_dict()
    sd.pop("head.bias")
    torch.save({"kind": "gpt", "config": m.cfg.to_dict(), "model": sd}, tmp_path / "partial.pt")
    _one_line_error(tmp_path / "partial.pt", "do not fit")


def test_clipgen_vqgan_is_refused_as_gpt():
    _one_line_error(COMPAT_DIR / "clipgen_vqgan_small.pt", "not a GPT checkpoint we know")


# ------------------------------------------------------------------------- speculative Jacobi decoding

def _peaked_gpt(vocab=8, n_tokens=16):
    """A small random GPT whose next-token distributions are far from uniform and depend on the prefix."""
    from models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, n_tokens=n_tokens, cond_dim=8, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


def _chi2_two_sample(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    ca, cb = torch.bincount(a, minlength=k).double(), torch.bincount(b, minlength=k).double()
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    return float((((ca * (nb / na).sqrt() - cb * (na / nb).sqrt()) ** 2) / (ca + cb)).sum()), int(keep.sum()) - 1


# chi-square critical values at p = 0.001 for the degrees of freedom the test meets
_CHI2_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize("kw", [{}, {"cfg_scale": 2.0, "top_k": 5}, {"temperature": 0.7, "top_p": 0.9}])
def test_sjd_draws_what_one_token_decoding_draws(kw):
    """Per position and for adjacent pairs, the tokens of 3000 grids drawn with parallel='sjd' and 3000 drawn
    one token at a time come from the same distribution (two-sample chi-square at p = 0.001), with fewer
    forwards."""
    model = _peaked_gpt()
    cond = F.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(1)), dim=-1).expand(3000, -1)
    plain = model.sample(cond, generator=torch.Generator().manual_seed(2), **kw)
    sjd = model.sample(cond, generator=torch.Generator().manual_seed(3), parallel="sjd", window=6, **kw)
    assert model.last_forwards < 16
    for pos in (0, 1, 2, 7, 15):
        stat, df = _chi2_two_sample(plain[:, pos], sjd[:, pos], 8)
        assert df == 0 or stat < _CHI2_001[df], (pos, stat, df)
    for pos in (1, 8):  # pairs: the joint distribution, not only the marginals (64 cells, 63 df at most)
        stat, df = _chi2_two_sample(plain[:, pos - 1] * 8 + plain[:, pos], sjd[:, pos - 1] * 8 + sjd[:, pos], 64)
        assert stat < df + 3.1 * (2 * df) ** 0.5 + 10, (pos, stat, df)  # ~ the 0.001 tail for df near 60


def test_sjd_greedy_equals_greedy_and_refuses_what_it_cannot_do():
    model = _peaked_gpt(vocab=32, n_tokens=24)
    cond = F.normalize(torch.randn(5, 8), dim=-1)
    for scale in (1.0, 3.0):
        for window in (1, 4, 30):
            want = model.sample(cond, top_k=1, cfg_scale=scale)
            assert torch.equal(model.sample(cond, top_k=1, cfg_scale=scale, parallel="sjd", window=window), want)
    with pytest.raises(ValueError, match="window"):
        model.sample(cond, parallel="sjd", window=0)
    with pytest.raises(ValueError, match="'sjd', 'zipar'"):
        model.sample(cond, parallel="medusa")
    with pytest.raises(ValueError, match="first_tokens"):
        model.sample(cond, parallel="sjd", first_tokens=torch.zeros(5, 2, dtype=torch.long))


# --------------------------------------------------------------------------- row-parallel decoding (ZipAR)

def _zipar_reference(model, cond, width, window):
    """Greedy row-parallel decoding from its definition, for a one-layer GPT (whose cached keys and values
    depend on each token and its position alone, so recomputing them from scratch is exact): at wavefront
    step t every row r with c = t - r * window in [0, width) draws token r * width + c from the tokens before
    it in raster order that were drawn at earlier steps; when a row starts, the row above's slots not drawn
    yet hold stand-ins until their tokens are drawn: the column's token in the nearest row above that has
    it, else that row's first token."""
    assert model.cfg.n_layer == 1
    n, P = model.cfg.n_tokens, model.cfg.n_prefix
    rows, B = n // width, cond.shape[0]
    out = torch.zeros(B, n, dtype=torch.long)
    drawn_at, stand = {}, {}
    blk = model.blocks[0]
    H, C = model.cfg.n_head, model.cfg.n_embd
    for t in range((rows - 1) * window + width):
        new = {}
        for r in range(1, rows):
            if r * window == t:                 # row r starts: stand-ins for the row above's undrawn tokens
                for j in range(width):
                    if (r - 1) * width + j not in drawn_at:
                        above = [a for a in range(r - 2, -1, -1) if a * width + j in drawn_at]
                        stand[(r - 1) * width + j] = (above[0] if above else r - 1) * width + (j if above else 0)
        for r in range(rows):
            c = t - r * window
            if not 0 <= c < width:
                continue
            p = r * width + c
            seq, seen = torch.zeros(B, n - 1, dtype=torch.long), torch.zeros(P + n - 1, dtype=torch.bool)
            seen[:P] = True
            for j in range(p):
                if j in drawn_at or j in stand:
                    seq[:, j], seen[P + j] = out[:, j if j in drawn_at else stand[j]], True
            x = torch.cat([model.prefix(cond), model.tok_emb(seq)], 1) + model.pos_emb[:, :P + n - 1]
            q_at = P + p - 1
            qkv = blk.attn.qkv(blk.ln_1(x)).view(B, -1, 3, H, C // H)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            att = (q[:, :, q_at:q_at + 1] @ k.transpose(-2, -1)) / (C // H) ** 0.5
            mask = seen.clone()
            mask[q_at + 1:] = False
            y = att.masked_fill(~mask, float("-inf")).softmax(-1) @ v                    # (B, H, 1, hd)
            h = x[:, q_at] + blk.attn.proj(y.transpose(1, 2).reshape(B, C))
            h = h + blk.mlp(blk.ln_2(h))
            new[p] = model.head(model.ln_f(h)).argmax(-1)
        for p, tok in new.items():
            out[:, p], drawn_at[p] = tok, t
    return out


def test_zipar_draws_each_token_from_what_the_wavefront_has_drawn():
    """Against the definition (a one-layer GPT recomputed from scratch per token), greedy: windows 1, 2, 3
    on 4 x 4 and 2 x 8 grids; the forwards are (rows - 1) * window + width."""
    from models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    for n, width in ((16, 4), (16, 8)):
        model = GPT(GPTConfig(vocab_size=8, n_tokens=n, cond_dim=8, n_layer=1, n_head=2, n_embd=32)).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(8.0)
        cond = F.normalize(torch.randn(6, 8), dim=-1)
        for window in (1, 2, 3):
            got = model.sample_zipar(cond, top_k=1, window=window, width=width)
            assert model.last_forwards == (n // width - 1) * window + width
            with torch.no_grad():
                want = _zipar_reference(model, cond, width, window)
            assert torch.equal(got, want), (n, width, window)
    # and it is not plain decoding: the test would pass a sampler that ignored the window
    assert not torch.equal(model.sample_zipar(cond, top_k=1, window=1, width=width), model.sample(cond, top_k=1))


def test_zipar_with_a_whole_row_window_is_one_token_decoding():
    """window >= the row: every row waits for the one above, so the tokens are one-token decoding's for the
    same seed (guidance, top-k, top-p, temperature); seeded runs repeat; bad arguments end in one line."""
    model = _peaked_gpt(vocab=32, n_tokens=16)
    cond = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    for kw in ({}, {"cfg_scale": 2.0, "top_k": 5}, {"temperature": 0.7, "top_p": 0.9}):
        want = model.sample(cond, generator=torch.Generator().manual_seed(4), **kw)
        for window in (4, 9):
            got = model.sample(cond, generator=torch.Generator().manual_seed(4), parallel="zipar", window=window,
                               **kw)
            assert torch.equal(got, want), (kw, window)
            assert model.last_forwards == 16
        a, b = (model.sample(cond, generator=torch.Generator().manual_seed(5), parallel="zipar", window=2, **kw)
                for _ in range(2))
        assert torch.equal(a, b) and model.last_forwards == 3 * 2 + 4
    assert model.sample(cond, parallel="zipar").shape == (5, 16) and model.last_forwards == 3 * 2 + 4  # half a row
    with pytest.raises(ValueError, match="window"):
        model.sample(cond, parallel="zipar", window=0)
    with pytest.raises(ValueError, match="not rows of 5"):
        model.sample_zipar(cond, width=5)
    with pytest.raises(ValueError, match="first_tokens"):
        model.sample(cond, parallel="zipar", first_tokens=torch.zeros(5, 2, dtype=torch.long))


def test_inverse_cdf_draws_in_proportion_and_never_a_zero_weight():
    from models.gpt import inverse_cdf
    w = torch.tensor([0.0, 1.0, 0.0, 2.0, 5.0, 0.0, 0.5, 0.0])
    picks = inverse_cdf(w.expand(40000, -1), torch.Generator().manual_seed(0))[:, 0]
    counts = torch.bincount(picks, minlength=8).double()
    assert counts[w == 0].sum() == 0
    expected = w.double() / w.sum() * 40000
    keep = w > 0
    assert float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()) < 16.27  # 3 df, p = 0.001
    again = inverse_cdf(w.expand(40000, -1), torch.Generator().manual_seed(0))[:, 0]
    assert torch.equal(picks, again)
    one = torch.zeros(3, 2, 5)
    one[..., 2] = 1e-30                                        # tiny sums and a batch of windows
    assert torch.equal(inverse_cdf(one), torch.full((3, 2, 1), 2))


# ------------------------------------------------------------------------------ static decode steps

@pytest.mark.parametrize("kw", [dict(), dict(top_k=5, temperature=0.7), dict(cfg_scale=2.5, top_p=0.9),
                                dict(top_k=1)])
def test_static_step_draws_the_eager_tokens(kw):
    m = sharp(n_prefix=2)
    _, cond = data()
    want = m.sample(cond, generator=gen(9), **kw)
    assert torch.equal(m.sample(cond, generator=gen(9), step="static", **kw), want)
    first = want[:, :5]
    assert torch.equal(m.sample(cond, generator=gen(2), first_tokens=first, step="static", **kw),
                       m.sample(cond, generator=gen(2), first_tokens=first, **kw))


def test_step_static_logits_equal_the_cached_forward_at_every_position():
    from models.gpt import StaticKVCache
    m = sharp(n_prefix=2)
    tokens, cond = data()
    full = m(tokens, cond)                                      # (B, N, V) teacher-forced
    cache = m.new_kv_cache(3)
    m(tokens[:, :1], cond, kv_cache=cache)                      # prefill: prefix + token 0
    static = StaticKVCache(cache)
    assert int(static.pos) == cache.length == 3
    for i in range(1, N - 1):
        logits = m.step_static(tokens[:, i:i + 1], static)    # token i -> prediction of token i + 1
        torch.testing.assert_close(logits, full[:, i + 1], rtol=1e-5, atol=1e-5)
        static.pos += 1
    # Slots not yet written hold zeros, not whatever new_empty left (a masked NaN would still poison).
    fresh = m.new_kv_cache(3)
    m(tokens[:, :1], cond, kv_cache=fresh)
    assert StaticKVCache(fresh).k[0][:, :, 3:].abs().sum() == 0


def test_step_option_refuses_what_it_cannot_do():
    m = sharp()
    _, cond = data()
    with pytest.raises(ValueError, match="needs a CUDA device, not cpu"):
        m.sample(cond, step="cuda-graph")
    with pytest.raises(ValueError, match="one of eager, static, cuda-graph"):
        m.sample(cond, step="compiled")
    with pytest.raises(ValueError, match="one-token steps"):
        m.sample(cond, step="static", parallel="sjd")


def test_static_steps_are_seen_by_forward_hooks_like_eager_steps():
    m = sharp()
    _, cond = data()
    for step in ("eager", "static"):
        calls = []
        handle = m.register_forward_hook(lambda *a: calls.append(1))
        m.sample(cond, step=step)
        handle.remove()
        assert len(calls) == N, step                            # one per token: what progress bars count


# ------------------------------------------------------------------------------ the condition MLP

def test_cond_hidden_puts_an_mlp_before_the_prefix_and_round_trips(tmp_path):
    m = tiny(2, cond_hidden=24)
    assert [tuple(p.shape) for p in m.cond_mlp.parameters()] == [(24, D), (24,), (24, 24), (24,)]
    assert tuple(m.cond_proj.weight.shape) == (2 * 32, 24)
    assert tiny(2).cond_mlp is None and tuple(tiny(2).cond_proj.weight.shape) == (2 * 32, D)
    # Fan-in initialisation, not N(0, 0.02): the first layer's rows keep a unit-norm input's scale.
    assert m.cond_mlp[0].weight.std().item() > 0.1
    _, cond = data()
    want = m.cond_proj(m.cond_mlp(cond)).view(3, 2, 32)
    torch.testing.assert_close(m.prefix(cond), want)
    drop = torch.tensor([True, False, True])
    got = m.prefix(cond, drop)
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[0], m.null_prefix)
    # Saved and loaded with its config; configs written before the field load as CLIP-GEN's linear map.
    torch.save({"kind": "gpt", "config": m.cfg.to_dict(), "model": m.state_dict()}, tmp_path / "g.pt")
    back = load_gpt(tmp_path / "g.pt")
    assert back.cfg.cond_hidden == 24
    torch.testing.assert_close(back.prefix(cond), m.prefix(cond))
    old = {k: v for k, v in tiny(2).cfg.to_dict().items() if k != "cond_hidden"}
    assert GPTConfig.from_dict(old).cond_hidden == 0
    # The MLP is trained: its matrices are in the decayed group, its biases not.
    decay, no_decay = m.param_groups(0.1)
    assert any(p is m.cond_mlp[0].weight for p in decay["params"])
    assert any(p is m.cond_mlp[0].bias for p in no_decay["params"])


def test_cond_hidden_samples_with_the_cache_as_without():
    m = tiny(1, cond_hidden=16)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    tokens, cond = data()
    full = m(tokens, cond)
    cache = m.new_kv_cache(3)
    steps = [m(tokens[:, :0], cond, kv_cache=cache)]
    steps += [m(tokens[:, i:i + 1], None, kv_cache=cache) for i in range(N - 1)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    a, b = m.sample(cond, generator=gen(3)), m.sample(cond, generator=gen(3), step="static")
    assert torch.equal(a, b)
