"""The EMA's warmed-up decay: initial weights are washed out early, the cap holds later, resume is exact."""
import torch
from torch import nn

from engine.ema import EMA, warmup_decay


def test_warmup_decay_starts_low_and_reaches_the_cap():
    assert warmup_decay(0.999, 0) == 0.1
    assert warmup_decay(0.999, 90) == 91 / 100
    assert warmup_decay(0.999, 100_000) == 0.999
    assert all(warmup_decay(0.999, n) <= warmup_decay(0.999, n + 1) for n in range(3000))


def test_initial_weights_fade_from_the_ema():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    ema = EMA(model, 0.999)
    init = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first update: 0.1 * init + 0.9 * new
    assert torch.allclose(ema.model.weight, 0.1 * init + 0.9)
    for _ in range(1999):
        ema.update(model)
    share_of_init = ((ema.model.weight - 1.0) / (init - 1.0)).mean().item()
    # product of the decays: (1/10)(2/11)...: about 1e-11 after 2000 updates, not 0.999^2000 = 13.5%
    assert share_of_init < 1e-6


def test_resumed_ema_continues_with_the_same_decays():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    a = EMA(model, 0.99)
    for i in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        a.update(model)
    b = EMA(nn.Linear(3, 3), 0.99)
    b.load_state_dict(a.state_dict(), updates=a.updates)
    with torch.no_grad():
        model.weight.add_(1.0)
    a.update(model)
    b.update(model)
    assert torch.equal(a.model.weight, b.model.weight) and a.updates == b.updates == 6
