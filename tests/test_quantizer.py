"""VectorQuantizer invariants: nearest-code lookup, straight-through gradients, loss, dead-code restart."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.quantizer import CodeUsage, VectorQuantizer, perplexity


def make_quantizer(n_codes=16, dim=4, seed=0, **kw):
    torch.manual_seed(seed)
    q = VectorQuantizer(n_codes, dim, **kw)
    # The default init is a tiny uniform box; spread the codes so that the lookup is not a near-tie.
    q.embedding.weight.data.normal_()
    return q


def flat(z):  # (B, D, h, w) -> (B*h*w, D), the row order the quantizer's indices use
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


@pytest.mark.parametrize("l2", [False, True])
def test_output_is_codebook_rows_at_indices(l2):
    q = make_quantizer(l2_norm=l2)
    z = torch.randn(2, 4, 3, 5)
    z_q, idx, _, _ = q(z)
    assert z_q.shape == z.shape and idx.shape == (2, 3, 5) and idx.dtype == torch.long
    cb = q.embedding.weight.detach()
    if l2:
        cb = F.normalize(cb, dim=1)
        assert torch.allclose(cb.norm(dim=1), torch.ones(len(cb)))
    assert torch.allclose(flat(z_q), cb[idx.flatten()], atol=1e-6)


@pytest.mark.parametrize("l2", [False, True])
def test_indices_are_true_nearest_codes(l2):
    q = make_quantizer(n_codes=64, dim=8, l2_norm=l2)
    z = torch.randn(4, 8, 6, 6)
    _, idx, _, _ = q(z)
    zf, cb = flat(z), q.embedding.weight.detach()
    if l2:
        zf, cb = F.normalize(zf, dim=1), F.normalize(cb, dim=1)
    d = torch.cdist(zf.double(), cb.double())  # (N, K) exact distances
    ref = d.argmin(1)
    chosen = d.gather(1, idx.flatten()[:, None]).squeeze(1)
    # The chosen code is a nearest one (up to float32 rounding of the expanded distance) ...
    assert torch.all(chosen <= d.min(1).values + 1e-5)
    # ... and the very one cdist picks wherever the two best codes are not a near-tie.
    top2 = d.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4
    assert clear.sum() > 0.9 * len(clear)
    assert torch.equal(idx.flatten()[clear], ref[clear])


def test_straight_through_gradient_is_identity():
    q = make_quantizer()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(2, 4, 3, 3)
    z_q, _, _, _ = q(z)
    (grad,) = torch.autograd.grad((z_q * w).sum(), z)
    assert torch.equal(grad, w)
    # The codebook gets nothing from the decoder's side: only the loss trains it.
    assert q.embedding.weight.grad is None


def test_straight_through_with_l2_passes_through_the_normalisation_only():
    q = make_quantizer(l2_norm=True)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(2, 4, 3, 3)
    z_q, _, _, _ = q(z)
    (grad,) = torch.autograd.grad((z_q * w).sum(), z)
    (ref,) = torch.autograd.grad((F.normalize(z, dim=1) * w).sum(), z)
    assert torch.allclose(grad, ref, atol=1e-6)


def test_loss_value_and_gradients_match_hand_computation():
    beta = 0.4
    q = make_quantizer(n_codes=8, dim=3, beta=beta)
    z = torch.randn(2, 3, 2, 4, requires_grad=True)
    _, idx, loss, _ = q(z)
    zf = flat(z).detach()
    e = q.embedding.weight.detach()[idx.flatten()]  # (N, D) assigned codes
    n = zf.numel()
    assert torch.allclose(loss, (1 + beta) * (e - zf).pow(2).mean(), rtol=1e-6)

    loss.backward()
    # Codebook term: d/de_k mean((e - z)^2) = sum over vectors assigned to k of 2 (e_k - z_i) / n.
    ref_cb = torch.zeros_like(q.embedding.weight).index_add_(0, idx.flatten(), 2 * (e - zf) / n)
    assert torch.allclose(q.embedding.weight.grad, ref_cb, atol=1e-7)
    # Commitment term: beta * 2 (z - e) / n flows to the encoder side; the codebook term does not.
    ref_z = (beta * 2 * (zf - e) / n).reshape(2, 2, 4, 3).permute(0, 3, 1, 2)
    assert torch.allclose(z.grad, ref_z, atol=1e-7)
    # Codes nobody picked get no gradient.
    unused = torch.ones(8, dtype=torch.bool)
    unused[idx.flatten()] = False
    assert torch.all(q.embedding.weight.grad[unused] == 0)


@pytest.mark.parametrize("l2", [False, True])
def test_embed_matches_forward_values(l2):
    q = make_quantizer(l2_norm=l2).eval()
    z = torch.randn(2, 4, 3, 5)
    z_q, idx, _, _ = q(z)
    e = q.embed(idx)
    assert e.shape == z_q.shape
    assert torch.allclose(e, z_q, atol=1e-6)


def test_stats_report_perplexity_and_batch_usage():
    q = make_quantizer(n_codes=16)
    _, idx, _, stats = q(torch.randn(2, 4, 4, 4))
    counts = torch.bincount(idx.flatten(), minlength=16).float()
    assert torch.isclose(stats["perplexity"], perplexity(counts))
    assert stats["batch_usage"].item() == pytest.approx(len(idx.unique()) / 16)


# ---------------------------------------------------------------- code search precision

def _bf16_codes(q, z):
    """Indices picked by an fp32 forward and by a forward under CPU bf16 autocast (training's setting)."""
    _, ref, _, _ = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got, _, _ = q(z)
    return ref, got


def test_bf16_autocast_picks_the_fp32_codes_when_the_gap_is_below_bf16_resolution():
    # z = (1, 0); code 0 = (1.003, 0) is nearest (distance^2 9e-6), code 1 = (1, 0.0045) next (2.0e-5).
    # In bf16, 1.003 rounds to 1.0 (spacing 2^-7 near 1), so a bf16 z.e puts code 0 at 6e-3 > code 1.
    q = VectorQuantizer(2, 2)
    q.embedding.weight.data = torch.tensor([[1.003, 0.0], [1.0, 0.0045]])
    z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    cb = q.embedding.weight.detach()
    z_dot_e_bf16 = cb[:, 0].bfloat16().float()  # z.e = e_0, rounded as a bf16 matmul rounds its inputs
    assert (1 + cb.pow(2).sum(1) - 2 * z_dot_e_bf16).argmin().item() == 1  # so the case is one bf16 flips
    ref, got = _bf16_codes(q, z)
    assert ref.item() == 0 and got.item() == 0


def test_bf16_autocast_picks_the_fp32_codes_on_near_ties():
    # Each z sits 0.02 off the midpoint of two codes (|a - b| ~ 11), towards a: a wins by 2*0.02*|a - b| ~ 0.5
    # in distance^2, while bf16 rounds dot products of size ~100 to steps of 0.5.
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(64, 8, generator=g) * 4
    a, b = torch.randint(0, 64, (2, 256), generator=g)
    a, b = a[a != b], b[a != b]
    zf = (cb[a] + cb[b]) / 2 + 0.02 * F.normalize(cb[a] - cb[b], dim=1)  # (N, 8)
    q = VectorQuantizer(64, 8)
    q.embedding.weight.data = cb.clone()
    ref, got = _bf16_codes(q, zf.T.reshape(1, 8, 1, -1))  # (1, D, 1, N): row order n
    d = torch.cdist(zf.double(), cb.double())
    top2 = d.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(ref.flatten()[clear], d.argmin(1)[clear])  # fp32 is the true nearest code
    assert torch.equal(got, ref)


# ---------------------------------------------------------------- dead-code restart

def restart_setup(**kw):
    """8 codes in 4-d: 0-3 sit on the data (+e_i), 4-7 point the other way (-e_i) and are never picked."""
    q = VectorQuantizer(8, 4, l2_norm=True, restart_threshold=0.5, usage_decay=0.5, **kw)
    q.embedding.weight.data = torch.cat([torch.eye(4), -torch.eye(4)]) * 3.0
    g = torch.Generator().manual_seed(0)
    z = (torch.eye(4).repeat(8, 1) * 5 + 0.3 * torch.randn(32, 4, generator=g)).reshape(2, 4, 4, 4)
    z = z.permute(0, 3, 1, 2).contiguous()  # (2, 4, 4, 4): 32 vectors near +e_i, any scale
    return q, z


def test_dead_codes_restart_from_normalised_batch_rows_and_used_codes_stay():
    q, z = restart_setup()
    w0 = q.embedding.weight.detach().clone()
    _, idx, _, _ = q(z)
    assert set(idx.unique().tolist()) == {0, 1, 2, 3}
    # One update: unused usage decays 1 -> 0.5, not yet below the threshold.
    assert torch.equal(q.embedding.weight, w0)
    assert q.n_updates.item() == 1
    assert torch.allclose(q.usage[4:], torch.full((4,), 0.5))
    assert torch.all(q.usage[:4] > 1)

    q(z)  # second update: 0.25 < 0.5, codes 4-7 are re-seeded
    w = q.embedding.weight.detach()
    assert torch.equal(w[:4], w0[:4])
    rows = F.normalize(flat(z), dim=1)
    for k in range(4, 8):
        assert not torch.equal(w[k], w0[k])
        assert (rows - w[k]).abs().amax(1).min() < 1e-6, f"code {k} is not a row of the normalised batch"
    assert torch.all(q.usage[4:] == 1.0)  # grace period again
    assert q.n_updates.item() == 2


def test_restart_seeds_raw_rows_without_l2():
    q, z = restart_setup()
    q.l2_norm = False
    q.embedding.weight.data[4:] = 50.0  # far from every input
    for _ in range(2):
        q(z)
    w = q.embedding.weight.detach()
    for k in range(4, 8):
        assert (flat(z) - w[k]).abs().amax(1).min() < 1e-6


def test_no_restart_or_usage_update_in_eval_mode_or_with_threshold_zero():
    q, z = restart_setup()
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    for _ in range(5):
        q(z)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    q.train()
    q.restart_threshold = 0.0
    for _ in range(5):
        q(z)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_restart_is_deterministic_given_n_updates():
    q1, z = restart_setup()
    q2, _ = restart_setup()
    seqs = [z, z.flip(0), z * 2, z]
    torch.manual_seed(1)  # the global RNG state must not matter
    for x in seqs:
        q1(x)
    torch.manual_seed(2)
    torch.rand(7)
    for x in seqs:
        q2(x)
    assert not torch.equal(q1.embedding.weight[4:], -3.0 * torch.eye(4))  # a restart did happen
    assert torch.equal(q1.embedding.weight, q2.embedding.weight)
    assert torch.equal(q1.usage, q2.usage)

    # Resume: a fresh quantizer given the mid-run state (n_updates included) continues identically.
    q3, _ = restart_setup()
    q4, _ = restart_setup()
    for x in seqs[:2]:
        q3(x)
    q4.load_state_dict(q3.state_dict())
    for x in seqs[2:]:
        q3(x)
        q4(x)
    assert torch.equal(q3.embedding.weight, q4.embedding.weight)
    assert torch.equal(q3.embedding.weight, q1.embedding.weight)


def test_restart_draw_depends_on_n_updates():
    q1, z = restart_setup()
    q2, _ = restart_setup()
    z = torch.randn(2, 4, 8, 8).abs()  # 128 distinct rows in the positive orthant: codes 4-7 stay unused
    q2.n_updates.fill_(100)
    for _ in range(2):
        q1(z)
        q2(z)
    assert not torch.equal(q1.embedding.weight[4:], q2.embedding.weight[4:])


# ---------------------------------------------------------------- perplexity and usage

@pytest.mark.parametrize("k", [1, 3, 7])
def test_perplexity_of_uniform_histogram_is_number_of_codes(k):
    counts = torch.zeros(10)
    counts[:k] = 5.0
    assert perplexity(counts).item() == pytest.approx(k, rel=1e-5)


def test_perplexity_of_one_hot_histogram_is_one():
    counts = torch.zeros(10)
    counts[4] = 123.0
    assert perplexity(counts).item() == pytest.approx(1.0)


def test_code_usage_summary():
    u = CodeUsage(8)
    u.update(torch.tensor([[0, 1], [1, 2]]))
    u.update(torch.tensor([[[2, 2]]]))
    assert u.counts.tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    s = u.summary()
    assert s["usage"] == pytest.approx(3 / 8)
    p = [1 / 6, 2 / 6, 3 / 6]
    assert s["perplexity"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))


def _restart_worker(rank, world, port, z, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(123)  # same initial codebook on every rank, as DDP's broadcast gives
    q = VectorQuantizer(64, 8, l2_norm=True, restart_threshold=0.999).train()
    shard = z.chunk(world)[rank]  # rank r holds the r-th contiguous slice of the global batch
    for _ in range(3):
        q(shard)
    torch.save(q.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_quantizer_restart_is_identical_across_ranks(tmp_path):
    """Restarts use the global batch (all_gather) and global counts (all_reduce): 2 ranks holding half a
    batch each end with exactly the codebook one process computes on the whole batch."""
    import socket

    import torch.multiprocessing as mp

    z = torch.randn(4, 8, 3, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_restart_worker, args=(2, port, z, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(123)
    single = VectorQuantizer(64, 8, l2_norm=True, restart_threshold=0.999).train()
    before = single.embedding.weight.detach().clone()
    for _ in range(3):
        single(z)
    assert not torch.equal(before, single.embedding.weight)  # restarts did happen
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in single.state_dict().items():
            assert torch.equal(got[k], v), (rank, k)
