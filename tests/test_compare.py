"""tests/compare.py, the "N processes equal one" judgement: it fails on a sync bug confined to one small tensor,
which the check it replaced (the share of differing elements over all tensors pooled) let pass.

The sync bug's size is measured: 2 gloo processes whose DDP skipped one tensor's all-reduce (its gradient
stayed per-rank) against 1 process, in test_train_vqgan's and test_train_gpt's runs. Adam's first step
is the sign of the gradient, which half a batch mostly shares, so after 4 steps the tensor can differ
modestly: the VQGAN's `decoder.norm_out.bias` in 8 of its 16 elements by up to 7e-5, the discriminator's
`main.6.bias` in 64 of its 256 by up to 1.2e-3, the GPT's `blocks.0.ln_1.bias` in 248 of its 256 by up to
2e-3; 0.0003%, 0.05% and 0.01% of the pooled elements: the pooled check passed all three."""
import torch

from tests.compare import attention_key_biases, compare_states
from tests.tiny import tiny_gpt

LR_SUM = 4 * 6e-4  # test_train_gpt's run: 4 steps at most at lr 6e-4


def pooled_check(a: dict, b: dict, bound: float) -> bool:
    """The check this replaces: up to 1% of all elements of all tensors pooled may differ."""
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    return bool((diff > 1e-5).float().mean() < 1e-2 and diff.max() < bound)


def trained_pair(seed: int = 0) -> tuple[dict, dict]:
    """A GPT's weights twice, as 1 and 2 processes leave them: float summation noise everywhere (1e-7) and
    Adam's noise flips, a few elements of each large weight off by up to the summed learning rate."""
    torch.manual_seed(seed)
    a = {k: v.clone() for k, v in tiny_gpt(n_layer=2).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    b = {}
    for k, v in a.items():
        w = v + 1e-7 * torch.randn(v.shape, generator=g)
        if v.numel() >= 4096:
            flips = torch.rand(v.shape, generator=g) < 0.002
            w = w + flips * LR_SUM * (2 * torch.rand(v.shape, generator=g) - 1)
        b[k] = w
    return a, b


def sync_bug(t: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """What a tensor whose all-reduce was skipped looks like (measured, above): half its elements off by up
    to 7e-5."""
    g = torch.Generator().manual_seed(seed)
    off = torch.rand(t.shape, generator=g) < 0.5
    return t + off * 7e-5 * (2 * torch.rand(t.shape, generator=g) - 1).sign()


def test_float_noise_and_adam_flips_pass():
    a, b = trained_pair()
    assert compare_states(a, b, bound=LR_SUM) == []
    assert pooled_check(a, b, LR_SUM)


def test_a_sync_bug_in_a_layernorm_bias_or_the_null_prefix_fails_where_the_pooled_check_passed():
    for key in ("blocks.0.ln_1.bias", "null_prefix", "ln_f.weight", "blocks.1.mlp.proj.bias"):
        a, b = trained_pair()
        b[key] = sync_bug(b[key])
        assert pooled_check(a, b, LR_SUM), key  # the old check: blind to it
        problems = compare_states(a, b, bound=LR_SUM)
        assert len(problems) == 1 and problems[0].startswith(key + " "), (key, problems)


def test_an_element_beyond_what_adam_can_move_fails():
    a, b = trained_pair()
    b["head.weight"][3, 5] += 2 * LR_SUM
    assert any(p.startswith("head.weight") and "bound" in p for p in compare_states(a, b, bound=LR_SUM))


def test_only_the_attention_key_biases_may_differ_throughout():
    """Adding one vector to every key leaves each query's softmax unchanged: the key bias's gradient is float
    noise, so Adam may move all of its elements (up to the bound). The query and value biases may not."""
    a, b = trained_pair()
    c = a["blocks.0.attn.qkv.bias"].shape[0] // 3  # (3C,) = [q | k | v]
    b["blocks.0.attn.qkv.bias"][c:2 * c] += 0.5 * LR_SUM
    assert compare_states(a, b, bound=LR_SUM) == []
    b["blocks.0.attn.qkv.bias"][2 * c:] += 0.5 * LR_SUM  # the value bias too: a real difference
    assert compare_states(a, b, bound=LR_SUM)[0].startswith("blocks.0.attn.qkv.bias")
    assert attention_key_biases("decoder.mid.attn_1.k.bias", torch.zeros(8)).all()
    assert attention_key_biases("decoder.up.3.attn.0.k.bias", torch.zeros(8)).all()
    assert attention_key_biases("decoder.up.3.attn.0.q.bias", torch.zeros(8)) is None
    assert attention_key_biases("transformer.resblocks.0.attn.in_proj_bias", torch.zeros(6)).tolist() == \
        [False, False, True, True, False, False]


def test_counters_keys_and_nan():
    a, b = trained_pair()
    assert compare_states({**a, "n": torch.tensor(3)}, {**b, "n": torch.tensor(4)}, bound=LR_SUM)
    assert compare_states(a, {**b, "extra": torch.zeros(1)}, bound=LR_SUM)[0].startswith("keys differ")
    b["ln_f.bias"][0] = float("nan")
    assert compare_states(a, b, bound=LR_SUM)[0].startswith("ln_f.bias")
