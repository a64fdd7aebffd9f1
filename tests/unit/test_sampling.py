"""Samplers (trainer/method/sampling.py): caching, prefixes, determinism, and the AR KV cache."""
import torch

from trainer.config import ModelConfig
from trainer.method import diffusion as D
from trainer.method import sampling as S
from trainer.model.dit import DiT

V = 16
MASK = V
EPS = 1e-3


def toy_denoiser(calls: list):
    """A time-agnostic denoiser whose prediction depends on both neighbours (so it changes as
    tokens are revealed): enough to exercise caching without training a model."""
    g = torch.Generator().manual_seed(0)
    left = torch.randn(V + 1, V + 1, generator=g) * 2
    right = torch.randn(V + 1, V + 1, generator=g) * 2

    def denoise(xt, t):
        calls.append(1)
        pad = torch.full_like(xt[:, :1], MASK)
        prev = torch.cat([pad, xt[:, :-1]], 1)
        nxt = torch.cat([xt[:, 1:], pad], 1)
        return D.masked_log_probs((left[prev] + right[nxt])[xt == MASK], MASK)

    return denoise


def run(steps, cache, seed=0, prefix=None, batch=6, L=24):
    calls = []
    x = S.sample_diffusion(toy_denoiser(calls), batch, L, steps, MASK, noise_eps=EPS, sampling_eps=1e-5,
                           generator=torch.Generator().manual_seed(seed), cache=cache, prefix=prefix)
    return x, len(calls)


def test_samples_are_complete_and_seeded():
    a, _ = run(16, cache=True, seed=3)
    b, _ = run(16, cache=True, seed=3)
    c, _ = run(16, cache=True, seed=4)
    assert not torch.any(a == MASK) and a.min() >= 0 and a.max() < V
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cached_sampling_equals_uncached_and_saves_calls():
    for steps in (4, 64, 256):
        cached, n_cached = run(steps, cache=True)
        plain, n_plain = run(steps, cache=False)
        assert torch.equal(cached, plain)
        assert n_plain == steps + (1 if n_plain > steps else 0)
        if steps == 256:  # many steps: most steps reveal nothing, so the cache skips most calls
            assert n_cached < n_plain / 2


def test_prefix_is_clamped():
    prompt = torch.tensor([3, 1, 4, 1, 5])
    x, _ = run(8, cache=True, prefix=prompt)
    assert torch.all(x[:, :5] == prompt)
    assert not torch.any(x == MASK)


def test_denoiser_from_model_is_time_agnostic_and_normalised():
    cfg = ModelConfig(vocab_size=V, n_layers=1, d_model=32, n_heads=2, cond_dim=16, max_seq_len=32)
    model = randomised(DiT(cfg)).eval()
    den = S.make_denoiser(model, MASK, EPS, time_conditioning=False)
    xt = torch.full((2, 10), MASK)
    xt[:, 3] = 7
    a = den(xt, torch.tensor([0.9, 0.9]))
    b = den(xt, torch.tensor([0.2, 0.2]))
    assert torch.equal(a, b)
    assert a.shape == (18, V)  # the masked positions only, MASK never predicted
    assert torch.allclose(a.exp().sum(-1), torch.ones(18), atol=1e-5)


def randomised(model):
    """DiT zero-initialises its head and adaLN (an untrained model is uniform): randomise them so
    the comparisons below are between non-trivial distributions."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_ar_kv_cache_sampling_equals_uncached():
    cfg = ModelConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=2, cond_dim=16, max_seq_len=40)
    model = randomised(DiT(cfg, causal=True)).eval()
    kw = dict(bos_id=MASK)
    cached = S.sample_ar(model, 4, 30, generator=torch.Generator().manual_seed(5), use_cache=True, **kw)
    plain = S.sample_ar(model, 4, 30, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert cached.shape == (4, 30)
    assert torch.equal(cached, plain)
    assert not torch.any(cached == MASK)
    assert len(set(cached.flatten().tolist())) > 3  # a real distribution, not one token
