"""VQGAN importers (models/convert.py): CLIP-GEN and taming-transformers checkpoints reproduce the outputs
their own code computed; configs inferred from shapes match the real ones; our own checkpoints round-trip."""
import json
import os
import sys
import types
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from models.convert import (CheckpointError, clipgen_config, convert_clipgen, convert_taming, detect_format,
                            load_state, load_vqgan, read_checkpoint, taming_config)
from models.vqgan import VQGAN, VQGANConfig
from tests.conftest import COMPAT_DIR

FIX = COMPAT_DIR

SMALL = {"clipgen": "clipgen_vqgan_small.pt", "taming": "taming_vqgan_small.ckpt"}
MANIFESTS = {"clipgen": "clipgen_vqgan_coco", "taming": "taming_vqgan_imagenet_f16_16384"}


def _load(name):
    return torch.load(FIX / name, map_location="cpu", weights_only=True)


def _expected(fmt):
    return _load(SMALL[fmt].split(".")[0] + ".expected.pt")


def _fields(fmt, c):
    """The foreign config dict in VQGANConfig's field names."""
    if fmt == "clipgen":
        return {"n_codes": c["codebook_size"], "embed_dim": c["embed_dim"], "ch": c["ch"],
                "ch_mult": tuple(c["ch_mult"]), "num_res_blocks": c["num_res_blocks"],
                "attn_resolutions": tuple(c["attn_resolutions"]), "resolution": c["resolution"]}
    dd = c["ddconfig"]
    assert not dd["double_z"]
    return {"n_codes": c["n_embed"], "embed_dim": c["embed_dim"], "z_channels": dd["z_channels"],
            "resolution": dd["resolution"], "in_channels": dd["in_channels"], "out_channels": dd["out_ch"],
            "ch": dd["ch"], "ch_mult": tuple(dd["ch_mult"]), "num_res_blocks": dd["num_res_blocks"],
            "attn_resolutions": tuple(dd["attn_resolutions"]), "dropout": dd["dropout"]}


def _infer(fmt, sd, **kw):
    return clipgen_config(sd, **kw) if fmt == "clipgen" else taming_config(sd, **kw)


def _assert_config(fmt, cfg, foreign):
    assert {k: getattr(cfg, k) for k in _fields(fmt, foreign)} == _fields(fmt, foreign)
    assert (cfg.l2_codes, cfg.restart_threshold) == (False, 0.0)  # plain Euclidean lookup, as trained
    assert cfg.norm_eps == {"clipgen": 1e-5, "taming": 1e-6}[fmt]
    if fmt == "clipgen":
        assert cfg.z_channels == cfg.embed_dim  # CLIP-GEN's encoder conv goes straight to embed_dim


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------- small fixtures

@pytest.mark.parametrize("fmt", ["clipgen", "taming"])
def test_small_fixture_reproduces_reference_outputs(fmt):
    exp = _expected(fmt)
    model = load_vqgan(FIX / SMALL[fmt])
    assert not model.training
    _assert_config(fmt, model.cfg, exp["config"])
    with torch.no_grad():
        quant, indices, _, _ = model.encode(exp["x"])
        recon = model.decode(quant)
        from_indices = model.decode_indices(exp["indices"])
    assert torch.equal(indices, exp["indices"])
    assert _rel(recon, exp["x_recon"]) < 1e-5
    assert _rel(from_indices, exp["x_recon"]) < 1e-5


@pytest.mark.parametrize("fmt", ["clipgen", "taming"])
def test_detect_format_and_inferred_config(fmt):
    obj = _load(SMALL[fmt])
    assert detect_format(obj) == fmt
    sd = obj["model"] if fmt == "clipgen" else obj["state_dict"]
    _assert_config(fmt, _infer(fmt, sd), _expected(fmt)["config"])
    # An explicit resolution keeps attention on the same level: the grid side at that level.
    cfg = _infer(fmt, sd, resolution=64)
    assert (cfg.resolution, cfg.attn_resolutions, cfg.grid_size) == (64, (32,), 32)
    with pytest.raises(CheckpointError):
        _infer(fmt, sd, resolution=33)


def test_clipgen_attention_unpacking():
    sd = _load(SMALL["clipgen"])["model"]
    out = convert_clipgen(sd)
    w, b = sd["encoder.mid.1.attn.in_proj_weight"], sd["encoder.mid.1.attn.in_proj_bias"]
    C = w.shape[1]
    assert torch.equal(out["encoder.mid.attn_1.k.weight"], w[C:2 * C].reshape(C, C, 1, 1))
    assert torch.equal(out["encoder.mid.attn_1.v.bias"], b[2 * C:])
    assert torch.equal(out["quant_conv.weight"], sd["encoder.final.3.weight"])
    assert not any(k.startswith("discriminator.") for k in out)
    with pytest.raises(CheckpointError, match="encoder.extra"):
        convert_clipgen({**sd, "encoder.extra.weight": torch.zeros(1)})


# ------------------------------------------------------------------- Lightning files (taming's releases)

MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def test_lightning_checkpoint_loads_without_lightning_and_reproduces_taming():
    """taming's released last.ckpt keys `callbacks` by Lightning's ModelCheckpoint class itself."""
    before = set(torch.serialization.get_safe_globals())
    exp = _load("taming_vqgan_small.expected.pt")
    with pytest.raises(Exception, match="ModelCheckpoint"):  # what a plain weights_only load says
        torch.load(FIX / "taming_vqgan_lightning.ckpt", weights_only=True)
    model = load_vqgan(FIX / "taming_vqgan_lightning.ckpt")
    _assert_config("taming", model.cfg, exp["config"])
    with torch.no_grad():
        quant, indices, _, _ = model.encode(exp["x"])
        recon = model.decode(quant)
    assert torch.equal(indices, exp["indices"])
    assert _rel(recon, exp["x_recon"]) < 1e-5
    obj = read_checkpoint(FIX / "taming_vqgan_lightning.ckpt")
    assert list(obj["callbacks"]) == [MODEL_CHECKPOINT]  # the stand-in class does not leak out
    assert obj["pytorch-lightning_version"] == "1.0.8"
    assert "pytorch_lightning" not in sys.modules
    assert set(torch.serialization.get_safe_globals()) == before  # allowed for the load only, not process-wide


class _Shell:
    """Pickles as a call of os.system: what a hostile checkpoint would carry."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def _fake_lightning(monkeypatch):
    """Importable pytorch_lightning.callbacks.{model_checkpoint,early_stopping} so that torch.save writes
    the GLOBALs Lightning 1.0.x writes (pytorch_lightning itself is not installed)."""
    classes = {}
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
                 "pytorch_lightning.callbacks.early_stopping"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for mod, cls in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping")):
        module = sys.modules[f"pytorch_lightning.callbacks.{mod}"]
        classes[cls] = type(cls, (), {"__module__": module.__name__})
        setattr(module, cls, classes[cls])
    return classes


def _lightning_file(path, callbacks, **extra):
    sd = _load("taming_vqgan_small.ckpt")["state_dict"]
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8", "callbacks": callbacks,
                "optimizer_states": [], "lr_schedulers": [], "state_dict": sd, **extra}, path)
    return path


@pytest.mark.parametrize("foreign", ["os.system", "another Lightning class"])
def test_lightning_file_with_any_other_global_is_refused_and_runs_nothing(tmp_path, monkeypatch, foreign):
    classes = _fake_lightning(monkeypatch)
    ok = {classes["ModelCheckpoint"]: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.5)}}
    assert load_vqgan(_lightning_file(tmp_path / "ok.ckpt", ok)).cfg.n_codes == 64  # the allowed layout
    marker = tmp_path / "pwned"
    if foreign == "os.system":
        path = _lightning_file(tmp_path / "bad.ckpt", ok, hyper_parameters=_Shell(f"touch {marker}"))
        named = f"{os.system.__module__}.system"  # posix.system on Linux
    else:
        path = _lightning_file(tmp_path / "bad.ckpt", {**ok, classes["EarlyStopping"]: {"wait_count": 0}})
        named = "pytorch_lightning.callbacks.early_stopping.EarlyStopping"
    monkeypatch.delitem(sys.modules, "pytorch_lightning")  # loading must not rely on (or import) it
    before = set(torch.serialization.get_safe_globals())
    with pytest.raises(CheckpointError) as e:
        load_vqgan(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"global {named!r}" in msg and "refused" in msg
    assert not marker.exists()
    assert set(torch.serialization.get_safe_globals()) == before


# ------------------------------------------------------------------------------ full-size key manifests

@pytest.mark.parametrize("fmt", ["clipgen", "taming"])
def test_full_size_manifest_converts_and_loads_strictly(fmt):
    manifest = json.loads((FIX / "full_size_key_manifests.json").read_text())[MANIFESTS[fmt]]
    sd = {k: torch.empty(shape, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
          for k, shape in manifest["keys"].items()}
    cfg = _infer(fmt, sd)
    _assert_config(fmt, cfg, manifest["config"])
    converted = convert_clipgen(sd) if fmt == "clipgen" else convert_taming(sd)
    with torch.device("meta"):
        model = VQGAN(cfg)
    load_state(model, converted, assign=True)
    assert model.quantize.embedding.weight.shape == (16384, 256)
    assert sum(p.numel() for p in model.parameters()) > 70_000_000
    # Strictness holds on meta too: a missing weight or a wrong shape is refused.
    with torch.device("meta"):
        model = VQGAN(cfg)
    with pytest.raises(CheckpointError):
        load_state(model, {k: v for k, v in converted.items() if k != "decoder.conv_out.bias"}, assign=True)
    with pytest.raises(CheckpointError):
        load_state(model, {**converted, "quant_conv.bias": torch.empty(7)}, assign=True)


# ------------------------------------------------------------------------------------ project checkpoints

TINY = VQGANConfig(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                   z_channels=8, embed_dim=4, n_codes=16)


def _tiny(seed):
    torch.manual_seed(seed)
    return VQGAN(TINY).eval()


def _outputs(model, x):
    with torch.no_grad():
        recon, indices, _, _ = model(x)
    return recon, indices


def test_project_checkpoint_round_trip_prefers_ema(tmp_path):
    model, ema = _tiny(0), _tiny(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    path = tmp_path / "vqgan.pt"
    torch.save({"kind": "vqgan", "config": TINY.to_dict(), "model": model.state_dict()}, path)
    loaded = load_vqgan(path)
    assert loaded.cfg == TINY and not loaded.training
    for a, b in zip(_outputs(loaded, x), _outputs(model, x)):
        assert torch.equal(a, b)

    torch.save({"kind": "vqgan", "config": TINY.to_dict(), "model": model.state_dict(),
                "ema": ema.state_dict()}, path)
    assert torch.equal(_outputs(load_vqgan(path), x)[0], _outputs(ema, x)[0])
    assert torch.equal(_outputs(load_vqgan(path, use_ema=False), x)[0], _outputs(model, x)[0])
    assert not torch.equal(_outputs(ema, x)[0], _outputs(model, x)[0])


def test_project_safetensors_round_trip(tmp_path):
    model = _tiny(2)
    path = tmp_path / "vqgan.safetensors"
    save_file(model.state_dict(), str(path), metadata={"kind": "vqgan", "config": json.dumps(TINY.to_dict())})
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    loaded = load_vqgan(path)
    assert loaded.cfg == TINY
    assert torch.equal(_outputs(loaded, x)[0], _outputs(model, x)[0])


# ------------------------------------------------------------------------------------------------- errors

def _one_line_error(path, **kw):
    with pytest.raises(CheckpointError) as e:
        load_vqgan(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_errors_are_one_line_and_name_the_file(tmp_path):
    assert "not found" in _one_line_error(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint\n" * 10)
    assert "cannot read" in _one_line_error(garbage)
    gpt = tmp_path / "gpt.pt"
    torch.save({"kind": "gpt", "config": {}, "model": {}}, gpt)
    assert "'gpt'" in _one_line_error(gpt)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    _one_line_error(tensor)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    assert "metadata" in _one_line_error(bare)
    wrong = tmp_path / "wrong.pt"  # a config that does not fit the weights
    torch.save({"kind": "vqgan", "config": replace(TINY, ch=16).to_dict(), "model": _tiny(0).state_dict()},
               wrong)
    assert "do not fit" in _one_line_error(wrong)


def test_clipgen_gpt_checkpoint_is_refused():
    msg = _one_line_error(FIX / "clipgen_gpt_small.pt")
    assert "expected a VQGAN checkpoint" in msg
