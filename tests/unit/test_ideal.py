"""The ideal SDTT student (trainer/method/ideal.py): the optimum of one round's divergence over the
teacher's m-step targets, by Monte Carlo over rollouts, checked against facts that hold without it."""
import numpy as np
import pytest
import torch

from trainer.config import SyntheticConfig
from trainer.data.synthetic import MarkovSource
from trainer.method import ideal, sdtt
from trainer.method import sampling as S
from trainer.model.oracle import MarkovOracle

V, L = 6, 8
T = torch.tensor([0.5])


def exact_teacher():
    src = MarkovSource(SyntheticConfig(vocab_size=V, branching=2, concentration=0.5, seed=3))
    oracle = MarkovOracle(torch.from_numpy(src.transition_matrix()), torch.from_numpy(src.stationary), L)
    return S.make_denoiser(oracle, V, 1e-3)


def ideal_of(teacher, m: int, rollouts: int, divergence: str, seed: int = 0):
    return ideal.ideal_denoiser(teacher, dt=0.2, teacher_steps=m, rollouts=rollouts, divergence=divergence,
                                mask_id=V, noise_eps=1e-3, t_min=1e-5, generator=torch.Generator().manual_seed(seed))


def test_combine_targets_is_the_geometric_mean_for_rkl_and_the_mean_for_fkl():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=(3, 4))  # [R, N, V]
    lt = torch.from_numpy(np.log(p))
    geo = np.exp(np.log(p).mean(0))
    np.testing.assert_allclose(ideal.combine_targets(lt, "rkl").exp().numpy(), geo / geo.sum(-1, keepdims=True))
    np.testing.assert_allclose(ideal.combine_targets(lt, "fkl").exp().numpy(), p.mean(0))
    with pytest.raises(ValueError, match="rkl, fkl"):
        ideal.combine_targets(lt, "tvd")


@pytest.mark.parametrize("divergence", ["rkl", "fkl"])
def test_with_one_teacher_step_the_ideal_student_is_the_teacher(divergence):
    teacher = exact_teacher()
    xt = torch.tensor([[2, V, V, 4, V, V, 1, V], [V] * L])
    got = ideal_of(teacher, 1, 5, divergence)(xt, T.repeat(2))
    torch.testing.assert_close(got, teacher(xt, T.repeat(2)), atol=1e-6, rtol=0)


def targets_and_se(teacher, xt, rollouts: int, seed: int):
    """An independent set of the same m = 2 targets: their mean and its Monte Carlo SE, per cell."""
    out = sdtt.teacher_rollout(teacher, xt.repeat(rollouts, 1), T.repeat(rollouts), 0.2, 2, V, 1e-3,
                               torch.Generator().manual_seed(seed))
    p = out.log_probs.view(rollouts, -1, V).double().exp()
    return p.std(0) / np.sqrt(rollouts)


def test_forward_kl_ideal_of_the_exact_teacher_is_its_one_step_prediction_where_one_draw_decides():
    """The self-consistency fact: with an exact teacher, the mean target E[p(x_i | x_1)] is
    p(x_i | x_t) when x_1 adds to i's gap between visible neighbours at most one token (a martingale).
    Here every gap holds at most 2 masked positions."""
    teacher = exact_teacher()
    xt = torch.tensor([[2, V, V, 4, V, V, 1, V]])
    r = 20000
    got = ideal_of(teacher, 2, r, "fkl")(xt, T).double().exp()
    want = teacher(xt, T).double().exp()
    se = targets_and_se(teacher, xt, r, seed=1)
    assert torch.all((got - want).abs() <= 4 * se + 1e-5)


def test_forward_kl_ideal_departs_from_the_exact_teacher_when_a_gap_draws_several_tokens_at_once():
    """The fact's limit: a teacher step draws the gap's tokens independently from their marginals, not
    from their joint, so with several masked neighbours in one gap the mean target is no longer the
    exact teacher's one-step prediction (by far more than the Monte Carlo error)."""
    teacher = exact_teacher()
    xt = torch.tensor([[V] * L])
    r = 20000
    got = ideal_of(teacher, 2, r, "fkl")(xt, T).double().exp()
    want = teacher(xt, T).double().exp()
    se = targets_and_se(teacher, xt, r, seed=1)
    assert ((got - want).abs() > 10 * se + 1e-3).any()


def test_reverse_kl_ideal_is_a_normalised_distribution_and_reproducible():
    teacher = exact_teacher()
    xt = torch.tensor([[V] * L, [3, V, V, V, V, V, V, 5]])
    a = ideal_of(teacher, 2, 16, "rkl", seed=4)(xt, T.repeat(2))
    b = ideal_of(teacher, 2, 16, "rkl", seed=4)(xt, T.repeat(2))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.double().exp().sum(-1), torch.ones(a.shape[0], dtype=torch.float64))
    assert a.shape == (int((xt == V).sum()), V)


def test_ideal_rows_pair_with_the_teachers_rows_and_equal_them_with_one_teacher_step():
    """With m = 1 the ideal student is the teacher, and its rows draw the evaluation's sampling noise:
    sample for sample they are the teacher's own rows, at every temperature, with no Monte Carlo error."""
    from trainer.config import load_config
    from trainer.evaluation.ideal import ideal_rows
    from trainer.evaluation.sweep import evaluate_model

    cfg = load_config(None, [f"model.vocab_size={V}", f"data.synthetic.vocab_size={V}", "data.synthetic.branching=2",
                             "data.synthetic.seed=3", f"data.seq_len={L}", f"model.max_seq_len={L}",
                             "distill.rounds=1", "distill.start_steps=8", "targets.teacher_steps=1", "targets.k=4",
                             "eval.num_samples=40", "eval.batch_size=16", "eval.temperatures=[0.7,1.0]",
                             "eval.ideal_rollouts=3"])
    src = MarkovSource(cfg.data.synthetic)
    oracle = MarkovOracle(torch.from_numpy(src.transition_matrix()), torch.from_numpy(src.stationary), L)
    teacher = {r["temperature"]: r for r in evaluate_model(oracle, cfg, [4], src, None, "cpu", sweep={4: [0.7, 1.0]})}
    ideal = ideal_rows(oracle, cfg, 1, src, None, "cpu")
    assert ideal["steps"] == 4 and [r["temperature"] for r in ideal["rows"]] == [0.7, 1.0]
    for row in ideal["rows"]:
        assert row["nll_per_sample"] == teacher[row["temperature"]]["nll_per_sample"]
        assert row["nll_mc_se"] == 0.0
