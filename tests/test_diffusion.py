"""diffusion.py against closed forms: schedules, Ho Eq. 4 / Eq. 7, DDPM = DDIM(eta=1), and exact-score
sampling of a Gaussian data distribution N(mu, s^2 I) recovering mu and s."""
import math

import numpy as np
import pytest
import torch

from data import UsageError
from diffusion import (SCHEDULES, Diffusion, ddim_step, ddpm_step, dpm_solver_step, guided_eps, make_betas,
                       respaced_timesteps, skewed_timesteps)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP stalls on a busy 2-core machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cumprod_loop(betas):
    """alpha_bar computed independently of numpy's cumprod."""
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - float(b)
        out.append(acc)
    return np.array(out)


def test_linear_schedule_closed_form():
    d = Diffusion("linear", 1000)
    betas = make_betas("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    assert d.alphas_cumprod.dtype == torch.float32
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), cumprod_loop(betas), rtol=1e-5, atol=1e-9)
    # linear schedule: alpha_bar_T = exp(sum log(1 - beta)) ~ 4.0e-5
    assert float(d.alphas_cumprod[-1]) == pytest.approx(math.exp(np.log1p(-betas).sum()), rel=1e-4)


def test_scaled_linear_endpoints_and_sqrt_linearity():
    betas = make_betas("scaled_linear", 1000)
    assert betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012)
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), (math.sqrt(0.012) - math.sqrt(0.00085)) / 999, rtol=1e-9)
    d = Diffusion("scaled_linear")
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), cumprod_loop(betas), rtol=1e-5, atol=1e-9)
    # paper.md §4.2: sqrt(alpha_bar_T) ~ 0.068 for the scaled-linear schedule
    assert float(d.sqrt_alphas_cumprod[-1]) == pytest.approx(0.068, abs=0.001)


def test_cosine_schedule_matches_formula():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = make_betas("cosine", T)
    abar = cumprod_loop(betas)
    unclipped = betas < 0.999
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    np.testing.assert_allclose(abar[unclipped], expected[unclipped], rtol=1e-9)
    assert betas.max() == pytest.approx(0.999) and unclipped[:-1].all()  # only the last beta is clipped


def test_unknown_schedule_is_usage_error():
    with pytest.raises(UsageError):
        make_betas("quadratic")
    assert set(SCHEDULES) == {"linear", "scaled_linear", "cosine"}


def test_q_sample_moments():
    d = Diffusion("scaled_linear")
    g = torch.Generator().manual_seed(0)
    n, t0 = 200_000, 300
    x0 = torch.full((n, 1), 1.5)
    t = torch.full((n,), t0, dtype=torch.long)
    xt = d.q_sample(x0, t, torch.randn(n, 1, generator=g))
    abar = float(d.alphas_cumprod[t0])
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 1.5, abs=4 * math.sqrt((1 - abar) / n))
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.02)


def test_q_posterior_matches_bayes_rule():
    """Ho Eq. 7 vs the product of Gaussians q(x_t | x_{t-1}) q(x_{t-1} | x0), derived independently."""
    d = Diffusion("linear")
    betas = make_betas("linear")
    abar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 10, 500, 999])
    x0, xt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    mean, var = d.q_posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        a, b, ab_prev = 1 - betas[ti], betas[ti], abar[ti - 1]
        precision = a / b + 1 / (1 - ab_prev)
        m = (math.sqrt(a) * xt[i].double() / b + math.sqrt(ab_prev) * x0[i].double() / (1 - ab_prev)) / precision
        assert float(var[i]) == pytest.approx(1 / precision, rel=1e-4)
        torch.testing.assert_close(mean[i].double(), m, rtol=1e-4, atol=1e-5)
    _, var0 = d.q_posterior(x0[:1], xt[:1], torch.tensor([0]))
    assert float(var0) == 0.0  # q(x_{-1} | x_0, x0) is a point mass at x0


def test_loss_is_zero_for_the_true_noise():
    d = Diffusion("cosine")
    x0 = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(2))

    def oracle(xt, t):  # recovers the sampled noise exactly from x_t (inverting Ho Eq. 4)
        return (xt - Diffusion._at(d.sqrt_alphas_cumprod, t, xt) * x0) / Diffusion._at(d.sqrt_one_minus_alphas_cumprod, t, xt)

    assert d.loss(oracle, x0, torch.Generator().manual_seed(3)).item() < 1e-6
    zero_loss = d.loss(lambda xt, t: torch.zeros_like(xt), x0, torch.Generator().manual_seed(3)).item()
    assert zero_loss == pytest.approx(1.0, abs=0.1)  # E[eps^2] = 1
    again = d.loss(lambda xt, t: torch.zeros_like(xt), x0, torch.Generator().manual_seed(3)).item()
    assert again == zero_loss


def test_ddpm_step_is_ho_algorithm_2_and_ddim_eta1():
    d = Diffusion("linear")
    g = torch.Generator().manual_seed(4)
    x, eps, z = (torch.randn(5, 3, generator=g) for _ in range(3))
    for t in (1, 400, 999):
        abar_t, abar_prev = float(d.alphas_cumprod[t]), float(d.alphas_cumprod[t - 1])
        beta = float(d.betas[t])
        ho = (x - beta / math.sqrt(1 - abar_t) * eps) / math.sqrt(1 - beta) + math.sqrt(float(d.posterior_variance[t])) * z
        torch.testing.assert_close(ddpm_step(x, eps, abar_t, abar_prev, z), ho, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ddim_step(x, eps, abar_t, abar_prev, 1.0, z), ho, rtol=1e-4, atol=1e-5)
    # last step (abar_prev = 1) returns the predicted x0 for both samplers, ignoring the noise
    abar0 = float(d.alphas_cumprod[0])
    x0 = (x - math.sqrt(1 - abar0) * eps) / math.sqrt(abar0)
    torch.testing.assert_close(ddpm_step(x, eps, abar0, 1.0, z), x0)
    torch.testing.assert_close(ddim_step(x, eps, abar0, 1.0, 0.0, z), x0)


def test_clip_bounds_predicted_x0():
    x, eps = torch.full((4,), 5.0), torch.zeros(4)
    assert ddim_step(x, eps, 0.9, 1.0, 0.0, eps, clip=1.0).abs().max().item() == pytest.approx(1.0)
    assert ddpm_step(x, eps, 0.9, 1.0, eps, clip=1.0).abs().max().item() == pytest.approx(1.0)


def gaussian_eps(d, mu, s):
    """Exact eps of data N(mu, s^2 I): eps*(x_t, t) = (x_t - sqrt(abar) mu) sqrt(1 - abar) / (abar s^2 + 1 - abar)."""
    def eps_fn(xt, t):
        abar = Diffusion._at(d.alphas_cumprod, t, xt)
        return (xt - abar.sqrt() * mu) * (1 - abar).sqrt() / (abar * s ** 2 + 1 - abar)
    return eps_fn


@pytest.mark.parametrize("sampler,eta,steps", [("ddim", 0.0, 50), ("ddim", 1.0, 100), ("ddpm", 0.0, 100),
                                               ("dpm++", 0.0, 50)])
def test_exact_score_sampling_recovers_gaussian(sampler, eta, steps):
    d = Diffusion("cosine")  # alpha_bar_T ~ 0, so x_T ~ N(0, I) matches q(x_T)
    mu, s = torch.tensor([1.0, -2.0, 0.5]), 1.0
    x = d.sample(gaussian_eps(d, mu, s), (4000, 3), steps=steps, sampler=sampler, eta=eta,
                 generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x.mean(0), mu, atol=0.06, rtol=0)
    assert x.std(0).mean().item() == pytest.approx(s, rel=0.05)


def test_ddim_discretisation_error_shrinks_with_steps():
    """DDIM(eta=0) is a discretised ODE: 50 steps under-disperse by ~3%, 250 steps by < 1.5%."""
    d = Diffusion("cosine")
    mu, s = torch.tensor([1.0, -2.0]), 0.5
    x_T = torch.randn(10000, 2, generator=torch.Generator().manual_seed(6))  # same x_T: sampling noise cancels
    std = {n: d.sample(gaussian_eps(d, mu, s), x_T.shape, steps=n, sampler="ddim", x_T=x_T).std(0).mean().item()
           for n in (50, 250)}
    assert std[50] < std[250] < s * 1.005
    assert std[250] == pytest.approx(s, rel=0.015)


def test_dpm_solver_first_step_is_ddim():
    """Without history DPM-Solver++ is first order: (sigma_p / sigma_t) x_t - alpha_p (e^-h - 1) x0 equals
    the DDIM(eta=0) update sqrt(abar_p) x0 + sqrt(1 - abar_p) eps; the last step (abar_p = 1) returns x0."""
    g = torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(5, generator=g), torch.randn(5, generator=g)
    abar_t, abar_p = 0.3, 0.55
    x0 = (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    x_prev, h = dpm_solver_step(x_t, x0, abar_t, abar_p)
    torch.testing.assert_close(x_prev, ddim_step(x_t, eps, abar_t, abar_p, 0.0, torch.zeros(5)))
    assert h == pytest.approx(0.5 * math.log(abar_p / (1 - abar_p)) - 0.5 * math.log(abar_t / (1 - abar_t)))
    assert dpm_solver_step(x_t, x0, abar_t, 1.0, x0 + 1, 0.7)[0] is x0


def test_dpm_solver_is_second_order():
    """Against the exact probability-flow ODE solution for Gaussian data (x_T -> mu + s (x_T - sqrt(abar_T) mu)
    / sqrt(abar_T s^2 + 1 - abar_T)), doubling the steps 50 -> 100 cuts DPM-Solver++(2M)'s error ~4x
    (second order) and DDIM's ~2x (first order)."""
    d = Diffusion("cosine")
    mu, s = torch.tensor([1.0, -2.0]), 0.5
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(6))
    abar_T = d.alphas_cumprod[-1]
    exact = mu + s * (x_T - abar_T.sqrt() * mu) / (abar_T * s ** 2 + 1 - abar_T).sqrt()
    err = {(sampler, n): (d.sample(gaussian_eps(d, mu, s), x_T.shape, steps=n, sampler=sampler, x_T=x_T) - exact).abs().max().item()
           for sampler in ("ddim", "dpm++") for n in (50, 100)}
    assert err["dpm++", 50] / err["dpm++", 100] > 3.0
    assert 1.5 < err["ddim", 50] / err["ddim", 100] < 2.5
    assert err["dpm++", 100] < err["ddim", 100] / 2


def test_sampler_calls_original_respaced_timesteps():
    d = Diffusion("scaled_linear")
    seen = []
    d.sample(lambda xt, t: (seen.append(t.clone()), torch.zeros_like(xt))[1], (2, 1), steps=10)
    ts = [int(t[0]) for t in seen]
    assert ts == respaced_timesteps(1000, 10).tolist() and ts[0] == 999 and ts[-1] == 0
    assert all(t.dtype == torch.long and t.shape == (2,) and (t == t[0]).all() for t in seen)
    assert respaced_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))


def test_same_seed_same_samples():
    d = Diffusion("linear")
    eps_fn = gaussian_eps(d, torch.zeros(2), 1.0)
    run = lambda seed, **kw: d.sample(eps_fn, (8, 2), steps=20, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    for kw in (dict(sampler="dpm++"), dict(sampler="ddim"), dict(sampler="ddpm"), dict(sampler="ddim", eta=0.5)):
        assert torch.equal(run(0, **kw), run(0, **kw))
        assert not torch.equal(run(0, **kw), run(1, **kw))
    x_T = torch.randn(8, 2)  # DDIM eta=0 from a given x_T is deterministic whatever the generator
    assert torch.equal(run(0, x_T=x_T), run(1, x_T=x_T))


def test_sample_rejects_bad_arguments():
    d = Diffusion()
    eps_fn = lambda xt, t: torch.zeros_like(xt)  # noqa: E731
    for kw in (dict(sampler="euler"), dict(steps=0), dict(steps=1001), dict(eta=1.5)):
        with pytest.raises(UsageError):
            d.sample(eps_fn, (1, 1), **kw)


def test_guided_eps_closed_form():
    c, u = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 3.0, -1.0])
    assert torch.equal(guided_eps(c, u, 0.0), c)
    torch.testing.assert_close(guided_eps(c, u, 1.0), 2 * c - u)
    torch.testing.assert_close(guided_eps(c, u, 0.4), torch.tensor([1.2, 1.6, -1.0]))


@pytest.mark.parametrize("skew", [-0.5, 0, 1, 3])
def test_skewed_timesteps_follow_their_closed_form_cdf(skew):
    """P(t < s) = (s/T)^(skew+1): uniform for 0, more of the draws on noisy timesteps as skew grows, on nearly
    clean ones below 0."""
    T = 1000
    t = skewed_timesteps(torch.rand(400_000, generator=torch.Generator().manual_seed(0)), T, skew)
    assert t.dtype == torch.long and 0 <= t.min() and t.max() <= T - 1
    for s in (100, 500, 900):
        assert (t < s).double().mean().item() == pytest.approx((s / T) ** (skew + 1), abs=3e-3)
    assert t.double().mean().item() / T == pytest.approx((skew + 1) / (skew + 2), abs=3e-3)


def test_v_prediction_target_and_its_eps_round_trip():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022): the oracle v has zero loss, and to_eps turns
    it back into the exact eps at every t, including t = T - 1 where the x0 weight of the eps loss vanishes."""
    d = Diffusion("linear", prediction="v")
    g = torch.Generator().manual_seed(6)
    x0, eps = torch.randn(64, 2, 4, 4, generator=g), torch.randn(64, 2, 4, 4, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    t[:4] = torch.tensor([0, 1, 500, 999])
    a, s = (Diffusion._at(tab, t, x0) for tab in (d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod))
    v = a * eps - s * x0
    xt = d.q_sample(x0, t, eps)
    assert d.loss(lambda x, tt: v, x0, t=t, noise=eps).item() == 0.0
    assert d.loss(lambda x, tt: torch.zeros_like(x), x0, t=t, noise=eps).item() == pytest.approx(v.square().mean().item())
    torch.testing.assert_close(d.to_eps(v, xt, t), eps, rtol=0, atol=1e-5)
    assert torch.equal(Diffusion("linear").to_eps(v, xt, t), v)  # eps-prediction: the output is eps
    with pytest.raises(UsageError):
        Diffusion(prediction="x0")


def test_v_prediction_samples_equal_eps_prediction_samples():
    """The exact v of a Gaussian, sampled through to_eps, gives the exact-eps samples (same noise, every sampler)."""
    mu, s = torch.tensor([1.0, -2.0, 0.5]), 0.7
    d_eps, d_v = Diffusion("cosine"), Diffusion("cosine", prediction="v")
    eps_fn = gaussian_eps(d_eps, mu, s)

    def v_fn(xt, t):  # v = (eps - sqrt(1 - abar) x_t) / sqrt(abar), from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        a, sig = (Diffusion._at(tab, t, xt) for tab in (d_v.sqrt_alphas_cumprod, d_v.sqrt_one_minus_alphas_cumprod))
        return (eps_fn(xt, t) - sig * xt) / a

    for sampler in ("dpm++", "ddim", "ddpm"):
        x = [d.sample(f, (500, 3), steps=20, sampler=sampler, generator=torch.Generator().manual_seed(7))
             for d, f in ((d_eps, eps_fn), (d_v, v_fn))]
        torch.testing.assert_close(x[1], x[0], rtol=0, atol=1e-3)
