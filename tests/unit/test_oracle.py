"""The exact teacher of a Markov source (trainer/model/oracle.py): its posterior against brute-force
enumeration, its samples against the source's entropy, its export, and where a student starts from it."""
import itertools

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, SyntheticConfig, load_config
from trainer.data.synthetic import MarkovSource
from trainer.distill.rounds import fresh_start
from trainer.errors import StageError
from trainer.layout import RunLayout
from trainer.method import diffusion as D
from trainer.method import sampling as S
from trainer.model.dit import DiT
from trainer.model.oracle import KIND, MarkovOracle, OracleError
from trainer.runtime.checkpoint import CheckpointError, export_kind, export_weights, load_model


def small_chain(v: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A dense positive transition matrix and its stationary law (left eigenvector, by numpy)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(v, 0.4), size=v) + 1e-3
    p /= p.sum(1, keepdims=True)
    w, vecs = np.linalg.eig(p.T)
    pi = np.real(vecs[:, np.argmin(np.abs(w - 1))])
    return p, pi / pi.sum()


def brute_posterior(p: np.ndarray, pi: np.ndarray, x: np.ndarray, mask: int) -> np.ndarray:
    """p(x_i | visible) at every position by enumerating all V^L sequences (tiny V, L only)."""
    v, length = p.shape[0], x.shape[0]
    out = np.zeros((length, v))
    for seq in itertools.product(range(v), repeat=length):
        if any(x[i] != mask and x[i] != seq[i] for i in range(length)):
            continue
        w = pi[seq[0]] * np.prod([p[seq[i], seq[i + 1]] for i in range(length - 1)])
        out[np.arange(length), seq] += w
    return out / out.sum(1, keepdims=True)


def test_posterior_equals_brute_force_enumeration():
    v, length = 3, 6
    p, pi = small_chain(v, seed=0)
    oracle = MarkovOracle(torch.from_numpy(p), torch.from_numpy(pi), length)
    rng = np.random.default_rng(1)
    xs = rng.integers(0, v, size=(12, length))
    xs[rng.random(xs.shape) < 0.6] = v  # MASK
    xs[0] = v  # all masked: every position's marginal is pi
    xs[1, :] = v
    xs[1, 0] = 2  # only the first visible
    xt = torch.from_numpy(xs)
    full = oracle(xt).double().exp()  # [B, L, V + 1], MASK column exp(-inf) = 0
    assert torch.all(full[..., v] == 0)
    for b in range(xs.shape[0]):
        want = brute_posterior(p, pi, xs[b], v)
        np.testing.assert_allclose(full[b, :, :v].numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(full[0, :, :v].numpy(), np.tile(pi, (length, 1)), rtol=1e-5)
    # rows= selects the masked positions in row-major order, as the DiT does
    rows = xt == v
    np.testing.assert_array_equal(oracle(xt, None, rows=rows).numpy(), oracle(xt)[rows].numpy())
    np.testing.assert_allclose(D.masked_log_probs(oracle(xt, None, rows=rows), v).exp().double().numpy(),
                               full[rows][:, :v].numpy(), rtol=1e-5, atol=1e-7)


def source_oracle(cfg: SyntheticConfig, length: int) -> tuple[MarkovSource, MarkovOracle]:
    src = MarkovSource(cfg)
    return src, MarkovOracle(torch.from_numpy(src.transition_matrix()), torch.from_numpy(src.stationary), length)


def test_samples_at_many_steps_score_the_source_entropy_and_few_steps_do_not():
    length = 16
    src, oracle = source_oracle(SyntheticConfig(vocab_size=8, branching=2, concentration=0.5, seed=7), length)
    denoise = S.make_denoiser(oracle, 8, 1e-3)
    floor = src.sequence_entropy_per_token(length)

    def nll(steps: int) -> np.ndarray:
        x = S.sample_diffusion(denoise, 2000, length, steps, 8, noise_eps=1e-3, sampling_eps=1e-5,
                               generator=torch.Generator().manual_seed(steps))
        return src.nll_per_token(x.numpy())

    many = nll(512)  # far more steps than positions: nearly one token per step, the exact joint
    assert abs(many.mean() - floor) < 3 * many.std(ddof=1) / np.sqrt(many.size) + 0.01
    few = nll(2)  # half the sequence drawn at once from per-position marginals
    assert few.mean() > floor + 10 * few.std(ddof=1) / np.sqrt(few.size)


def test_refuses_a_chain_with_zero_transitions_and_names_the_key():
    p, pi = small_chain(3, seed=0)
    p[0, 1] = 0.0
    with pytest.raises(OracleError, match="data.synthetic.leak"):
        MarkovOracle(torch.from_numpy(p), torch.from_numpy(pi), 4)


def export_oracle(run, overrides=()):
    cfg = load_config(None, ["model.vocab_size=8", "data.synthetic.vocab_size=8", "data.seq_len=16",
                             "model.max_seq_len=16", "teacher.source=oracle", *overrides])
    _, oracle = source_oracle(cfg.data.synthetic, cfg.data.seq_len)
    state = oracle.state_dict()
    export_weights(RunLayout(run).export(0), state, state, cfg, step=0, kind=KIND)
    return cfg, oracle


def test_export_round_trip_loads_the_oracle_with_the_dit_interface(tmp_path):
    cfg, oracle = export_oracle(tmp_path)
    export = RunLayout(tmp_path).export(0)
    assert export_kind(export) == KIND
    loaded, saved = load_model(export, "ema", cfg.model)
    assert isinstance(loaded, MarkovOracle) and saved.teacher.source == "oracle"
    x = torch.tensor([[8, 3, 8, 8, 1, 8] + [8] * 10])
    torch.testing.assert_close(loaded(x, None, rows=x == 8), oracle(x, None, rows=x == 8))
    with pytest.raises(CheckpointError, match="causal"):
        load_model(export, "ema", cfg.model, causal=True)


def test_student_and_control_start_from_init_from_or_scratch(tmp_path):
    cfg, _ = export_oracle(tmp_path / "run")
    layout = RunLayout(tmp_path / "run")
    teacher_file = layout.export(0) / "ema.safetensors"
    start = fresh_start(cfg, layout, teacher_file)
    assert start.kind == "scratch" and start.record["seed"] == cfg.train.seed
    # a trained DiT export as the starting point: its EMA weights (targets.use_ema)
    dit = DiT(cfg.model)
    export_weights(tmp_path / "trained", dit.state_dict(), dit.state_dict(), cfg, step=5)
    cfg2 = load_config(None, ["model.vocab_size=8", "data.synthetic.vocab_size=8", "data.seq_len=16",
                              "model.max_seq_len=16", "teacher.source=oracle",
                              f"teacher.init_from={tmp_path / 'trained'}"])
    start = fresh_start(cfg2, layout, teacher_file)
    assert start.kind == "export" and start.path == str(tmp_path / "trained" / "ema.safetensors")
    # the exact teacher itself is no starting point for a network
    cfg3 = load_config(None, ["model.vocab_size=8", "data.synthetic.vocab_size=8", "data.seq_len=16",
                              "model.max_seq_len=16", "teacher.source=oracle",
                              f"teacher.init_from={layout.export(0)}"])
    with pytest.raises(StageError, match="teacher.init_from"):
        fresh_start(cfg3, layout, teacher_file)


def test_config_refuses_an_oracle_without_a_synthetic_source_or_with_no_leak():
    with pytest.raises(ConfigError, match="teacher.source"):
        load_config(None, ["teacher.source=oracle", "data.source=text", "data.paths=[x]"])
    with pytest.raises(ConfigError, match="data.synthetic.leak"):
        load_config(None, ["teacher.source=oracle", "data.synthetic.leak=0"])


def test_config_refuses_an_ideal_row_it_cannot_score():
    with pytest.raises(ConfigError, match="eval.ideal_rollouts"):
        load_config(None, ["eval.ideal_rollouts=4", "distill.divergence=tvd", "targets.codec=topk"])
    with pytest.raises(ConfigError, match="eval.ideal_rollouts"):
        load_config(None, ["eval.ideal_rollouts=4", "data.source=text", "data.paths=[x]"])
    with pytest.raises(ConfigError, match="eval.ideal_repeats"):
        load_config(None, ["eval.ideal_rollouts=4", "eval.ideal_repeats=1"])
    assert load_config(None, ["eval.ideal_rollouts=4", "distill.divergence=fkl"]).eval.ideal_rollouts == 4
