"""models/packed.py: prepacked oneDNN linears for the CPU decode step agree with F.linear, never serve a stale
weight, stay out of training, autocast and copies, and leave sampling's tokens unchanged."""
import copy

import pytest
import torch
import torch.nn.functional as F

from models import packed
from models.convert_gpt import load_gpt
from models.gpt import GPT, GPTConfig
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not packed.supported(torch.float32), reason="oneDNN is not built into this torch")


def _layer(seed=0, n_in=64, n_out=96):
    torch.manual_seed(seed)
    return packed.Linear(n_in, n_out)


def _is_packed(lin) -> bool:
    return packed._packed(lin.weight) is not None


def test_packed_path_agrees_with_f_linear_and_is_taken():
    lin = _layer()
    assert packed.pack_linears(lin, 8) == 1 and _is_packed(lin)
    assert packed.pack_linears(lin, 8) == 0  # nothing changed: nothing packed again
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    try:
        torch.ops.mkldnn._linear_pointwise = lambda *a: calls.append(1) or real(*a)
        with torch.no_grad():
            for shape in [(1, 64), (8, 64), (4, 3, 64), (2, 5, 64)]:
                x = torch.randn(*shape)
                torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
            x = torch.randn(5, 8, 64).transpose(0, 1)                     # not contiguous
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
            n = len(calls)
            lin(torch.randn(packed.MAX_ROWS + 1, 64))                     # many rows: MKL, not oneDNN
            assert len(calls) == n
    finally:
        torch.ops.mkldnn._linear_pointwise = real
    assert len(calls) == 5


def test_a_changed_weight_is_never_served_stale():
    lin = _layer()
    packed.pack_linears(lin, 4)
    x = torch.randn(4, 64)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).square().sum().backward()                                      # grads on: the plain path
    opt.step()
    with torch.no_grad():
        assert not _is_packed(lin)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
        lin.load_state_dict(_layer(seed=1).state_dict())                  # a load copies in place
        torch.testing.assert_close(lin(x), _layer(seed=1)(x))
        packed.pack_linears(lin, 4)
        assert _is_packed(lin)
        torch.testing.assert_close(lin(x), _layer(seed=1)(x), rtol=1e-5, atol=1e-5)


def test_training_autocast_and_copies_take_the_plain_path():
    lin = _layer()
    packed.pack_linears(lin, 4)
    x = torch.randn(4, 64, requires_grad=True)
    y = lin(x)
    assert y.grad_fn is not None and torch.equal(y, F.linear(x, lin.weight, lin.bias))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
    twin = copy.deepcopy(lin)                      # the packed copy is not on the module: copying works
    assert not _is_packed(twin)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), lin(x), rtol=1e-5, atol=1e-5)
    key = id(lin.weight)
    del lin, y
    assert key not in packed._PACKED               # the packed copy goes with its weight


def test_unsupported_dtype_is_left_alone():
    lin = _layer().to(torch.float64)
    assert packed.pack_linears(lin, 4) == 0
    x = torch.randn(4, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_bf16_is_packed_only_where_onednn_can_and_then_agrees():
    lin = _layer().to(torch.bfloat16)
    can = packed.supported(torch.bfloat16)         # CPUs with AVX512-BF16 / AMX: yes; plain AVX2: no
    assert packed.pack_linears(lin, 8) == int(can) and _is_packed(lin) == can
    x = torch.randn(8, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x.float(), lin.weight.float(), lin.bias.float()),
                               rtol=2e-2, atol=2e-2)


def test_sampling_draws_the_same_tokens_packed_or_not():
    gpt = load_gpt(REPO / "pretrained" / "shapes" / "gpt.safetensors")
    cond = F.normalize(torch.randn(6, gpt.cfg.cond_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    runs = {}
    for pack in (False, True):
        gpt.pack_decoding = pack
        packed.unpack_linears(gpt)
        runs[pack] = [gpt.sample(cond, top_k=1), gpt.sample(cond, generator=torch.Generator().manual_seed(3)),
                      gpt.sample(cond, cfg_scale=2.0, generator=torch.Generator().manual_seed(4))]
        assert all(_is_packed(m) for m in gpt.modules() if isinstance(m, packed.Linear)) == pack
    for a, b in zip(runs[False], runs[True]):
        assert torch.equal(a, b)
    assert set(gpt.state_dict()) == set(GPT(gpt.cfg).state_dict())   # packing adds nothing to what is saved
    fresh = GPT(GPTConfig(vocab_size=16, n_tokens=4, n_layer=1, n_head=2, n_embd=16, cond_dim=8))
    assert not any(_is_packed(m) for m in fresh.modules() if isinstance(m, packed.Linear))
