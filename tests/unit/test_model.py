"""The DiT backbone: shapes, paper parameter counts, attention masks, KV cache, time conditioning."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from trainer.config import ModelConfig, load_config
from trainer.model.dit import DiT, count_parameters

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CFG = ModelConfig(vocab_size=50, n_layers=2, d_model=64, n_heads=4, cond_dim=32, max_seq_len=32)
V1 = CFG.vocab_size + 1


def randomized(model: DiT, seed: int = 0) -> DiT:
    """Random weights everywhere: the zero-initialised adaLN and head would hide most bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def tokens(b: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V1, (b, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("causal", [False, True])
def test_shapes_and_float32_logits(causal):
    model = randomized(DiT(CFG, causal=causal))
    x = tokens(3, 10)
    out = model(x, torch.rand(3))
    assert out.shape == (3, 10, V1) and out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = model(x)
    assert out_bf16.dtype == torch.float32
    assert torch.allclose(out_bf16, out, atol=0.1, rtol=0.05)


def test_untrained_model_predicts_uniform_logits():
    # adaLN and the head are zero-initialised (DiT): blocks are identities and logits are all zero.
    assert torch.equal(DiT(CFG)(tokens(2, 8)), torch.zeros(2, 8, V1))


@pytest.mark.parametrize("name,expected", [("small", 169e6), ("medium", 424e6), ("large", 863e6)])
def test_paper_parameter_counts(name, expected):
    cfg = load_config(CONFIGS / f"{name}.yaml").model
    with torch.device("meta"):  # count without allocating
        n = count_parameters(DiT(cfg))
    print(f"{name}: {n:,} parameters ({n / 1e6:.1f}M, paper {expected / 1e6:.0f}M)")
    assert abs(n - expected) / expected < 0.02


def test_causal_cached_equals_uncached():
    model = randomized(DiT(CFG, causal=True))
    x = tokens(2, 12)
    full = model(x)

    cache = model.init_cache(2, 16, "cpu")
    steps = torch.cat([model.forward_cached(x[:, i : i + 1], cache, i) for i in range(12)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)

    # A prefill then chunks appended after a prefix (the bottom-right aligned causal mask).
    cache = model.init_cache(2, 16, "cpu")
    chunks = [model.forward_cached(x[:, a:b], cache, a) for a, b in ((0, 5), (5, 8), (8, 9), (9, 12))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="overflow"):
        model.forward_cached(x[:, :2], cache, 15)


def test_forward_cached_needs_causal_model():
    model = DiT(CFG)
    with pytest.raises(RuntimeError, match="causal"):
        model.forward_cached(tokens(1, 1), model.init_cache(1, 4, "cpu"), 0)


def test_bidirectional_vs_causal_attention():
    x = tokens(2, 10)
    x2 = x.clone()
    x2[:, -1] = (x[:, -1] + 1) % V1  # change the last token only

    bi = randomized(DiT(CFG))
    assert not torch.allclose(bi(x)[:, 0], bi(x2)[:, 0])  # the first position sees the last

    ar = randomized(DiT(CFG, causal=True))
    a, b = ar(x), ar(x2)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=0, rtol=0)  # the past never sees the future
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_time_conditioning():
    x, sigma = tokens(2, 8), torch.tensor([0.3, 2.0])
    off = randomized(DiT(CFG))  # time_conditioning=False: sigma is replaced by zeros
    ref = off(x)
    torch.testing.assert_close(off(x, sigma), ref, atol=0, rtol=0)
    torch.testing.assert_close(off(x, torch.zeros(2)), ref, atol=0, rtol=0)

    on = randomized(DiT(dataclasses.replace(CFG, time_conditioning=True)))
    assert not torch.allclose(on(x, sigma), on(x, torch.zeros(2)))
    with pytest.raises(ValueError, match="sigma"):
        on(x)


def test_eval_is_deterministic_and_train_uses_dropout():
    model = randomized(DiT(dataclasses.replace(CFG, dropout=0.1)))
    x = tokens(2, 8)
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_rotary_frequencies_survive_dtype_casts_and_meta_init():
    fresh = DiT(CFG).rotary_emb.inv_freq.clone()
    model = DiT(CFG).bfloat16()  # DeepSpeed's bf16 mode casts the whole module like this
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary_emb.inv_freq, fresh)
    assert model(tokens(1, 4)).dtype == torch.float32

    with torch.device("meta"):
        meta = DiT(CFG)
    meta.to_empty(device="cpu")
    torch.testing.assert_close(meta.rotary_emb.inv_freq, fresh)
    assert "rotary_emb.inv_freq" not in meta.state_dict()  # derived, not learned: not persisted


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_head_on_selected_rows_equals_the_full_forward(time_conditioning):
    """rows=mask runs the output head on the masked positions only, each with its own sample's
    adaLN modulation; the denoiser built on it gives the SUBS log-probs of the full forward at the
    masked positions."""
    from trainer.method import diffusion as D
    from trainer.method.sampling import make_denoiser

    cfg = dataclasses.replace(CFG, time_conditioning=time_conditioning)
    model = randomized(DiT(cfg))
    mask_id = cfg.vocab_size
    x = tokens(3, 20)
    x[torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.5] = mask_id
    x[1] = mask_id  # an all-masked sample
    x[2, :] = torch.arange(20) % mask_id  # and one with nothing masked
    sigma = torch.tensor([0.3, 1.2, 2.0])
    rows = x == mask_id
    with torch.no_grad():
        full = model(x, sigma)
        part = model(x, sigma, rows=rows)
    assert part.shape == (int(rows.sum()), V1)
    torch.testing.assert_close(part, full[rows], rtol=1e-5, atol=1e-5)
    t = torch.tensor([0.2, 0.7, 0.9])
    got = make_denoiser(model, mask_id, 1e-3, time_conditioning)(x, t)
    want = D.subs_log_probs(model(x, D.sigma_of_t(t, 1e-3) if time_conditioning else None), x, mask_id)
    torch.testing.assert_close(got, want[rows][:, :mask_id], rtol=1e-5, atol=1e-5)
