"""engine.checkpoint.load_optimizer_state: optimizer moments saved in one memory layout resume correctly
into parameters of another (a --channels-last checkpoint resumed with --no-channels-last, or the reverse)."""
import pytest
import torch

from engine.checkpoint import load_optimizer_state


def _two_steps(fused: bool, saved_layout, param_layout, loader):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4, 3, 3).contiguous(memory_format=param_layout))
    opt = torch.optim.Adam([p], lr=0.1, fused=fused)
    p.grad = torch.randn(8, 4, 3, 3).contiguous(memory_format=param_layout)
    opt.step()
    state = opt.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):
        state["state"][0][key] = state["state"][0][key].contiguous(memory_format=saved_layout)
    opt2 = torch.optim.Adam([p], lr=0.1, fused=fused)
    loader(opt2, state)
    p.grad = torch.randn(8, 4, 3, 3).contiguous(memory_format=param_layout)
    opt2.step()
    return p.detach().contiguous(), opt2.state[p]["exp_avg"]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("saved,param", [(torch.channels_last, torch.contiguous_format),
                                         (torch.contiguous_format, torch.channels_last)])
def test_moments_follow_the_parameter_layout(fused, saved, param):
    ref, _ = _two_steps(fused, param, param, load_optimizer_state)        # same layout throughout
    got, moment = _two_steps(fused, saved, param, load_optimizer_state)
    torch.testing.assert_close(got, ref)
    assert moment.is_contiguous(memory_format=param)


def test_plain_load_state_dict_with_fused_adam_is_the_hazard_this_guards():
    # If PyTorch ever fixes its fused kernel, this fails and load_optimizer_state's copy can go.
    ref, _ = _two_steps(True, torch.contiguous_format, torch.contiguous_format, load_optimizer_state)
    got, _ = _two_steps(True, torch.channels_last, torch.contiguous_format, lambda o, s: o.load_state_dict(s))
    assert (got - ref).abs().max() > 1e-3
