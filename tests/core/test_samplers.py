"""Tests for the probability-flow ODE samplers (DPM-Solver++(2M), Heun), their timestep grids and
SamplerConfig, against independent references and without training.

References: with the exact denoiser for Gaussian data N(m, s^2) (GaussianOracle of test_diffusion)
every deterministic sampler is an affine map x_T -> A x_T + B per dimension, so its output is
exactly N(B, A^2) for x_T ~ N(0, 1); (A, B) are propagated here in float64 numpy from the papers'
update equations (Lu et al. 2022 Algorithm 2; Karras et al. 2022 Algorithm 1, written literally in
the VE form x/alpha), independently of the torch code. The probability-flow ODE of Gaussian data
is solved in closed form (exact_flow_map). diffusers' DPMSolverMultistepScheduler and
HeunDiscreteScheduler, fed the same model, give the same trajectories.
"""
import numpy as np
import pytest
import torch

from genbench.config import from_dict
from genbench.core.diffusion import gaussian_noise
from genbench.core.samplers import (
    SAMPLER_SPACINGS,
    SamplerConfig,
    ddim_sample,
    ddim_timesteps,
    dpmpp_2m_sample,
    heun_levels,
    heun_sample,
    sample,
    solver_timesteps,
)
from genbench.errors import GenbenchError
from tests.core.test_diffusion import M, N_SAMPLES, S, GaussianOracle, _oracle_step, assert_moments, make

SOLVERS = {"ddim": ddim_sample, "dpm++2m": dpmpp_2m_sample, "heun": heun_sample}


def grid(d, name, steps, spacing):
    """The timesteps at which the sampler calls the network (Heun: its N levels)."""
    if name == "ddim":
        return ddim_timesteps(d.num_timesteps, steps, spacing).numpy()
    return solver_timesteps(d, heun_levels(steps) if name == "heun" else steps, spacing).numpy()


# ---------------------------------------------------------------------------------------------
# independent references: each solver as an affine map of x_T, P = [A; B] (2, D), x = A x_T + B

E1 = np.array([[0.0], [1.0]])  # the constant row: c * E1 is the affine map x_T -> c


def vp_denoiser(P, a, m, s):
    """x0_hat = m + k (x - sqrt(a) m) (the oracle at alpha_bar a) of the affine x = P."""
    k, _ = _oracle_step(a, m, s)
    return k * P + (m - k * np.sqrt(a) * m) * E1


def ve_denoiser(P, sigma, m, s):
    """D(x~; sigma) = m + s^2/(s^2 + sigma^2) (x~ - m): the posterior mean of x0 given
    x~ = x0 + sigma eps, x0 ~ N(m, s^2) (Karras et al.'s denoiser, eq. 2-3, for Gaussian data)."""
    g = s**2 / (s**2 + sigma**2)
    return g * P + (1 - g) * m * E1


def exact_dpmpp_2m_map(ab, tau, m, s):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with the oracle on the grid tau, then the first-
    order step to sigma = 0 (x = x0_hat): lambda = log(alpha/sigma), h_i = lambda_{i+1} - lambda_i,
    x_{i+1} = sigma_{i+1}/sigma_i x_i - alpha_{i+1} (e^{-h_i} - 1) D_i, D_0 = x0_0,
    D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}, r_i = h_{i-1}/h_i."""
    lam = 0.5 * np.log(ab / (1 - ab))
    P, prev, h_prev = np.vstack([np.ones_like(m), np.zeros_like(m)]), None, None
    for i, t in enumerate(tau):
        x0 = vp_denoiser(P, ab[t], m, s)
        if i == len(tau) - 1:
            return x0
        t_next = tau[i + 1]
        h = lam[t_next] - lam[t]
        D = x0 if i == 0 else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * prev
        P = np.sqrt((1 - ab[t_next]) / (1 - ab[t])) * P - np.sqrt(ab[t_next]) * (np.exp(-h) - 1) * D
        prev, h_prev = x0, h


def exact_heun_map(ab, tau, m, s):
    """Karras et al. 2022 Algorithm 1 (S_churn = 0), literally: x~_0 = x_T/alpha_0 = x_T sqrt(1 +
    sigma_0^2), d_i = (x~_i - D(x~_i; sigma_i))/sigma_i, Euler x~' = x~_i + (sigma_{i+1} - sigma_i) d_i,
    and unless sigma_{i+1} = 0 the trapezoid x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i)(d_i + d')/2."""
    sig = np.append(np.sqrt((1 - ab[tau]) / ab[tau]), 0.0)
    P = np.vstack([np.full_like(m, np.sqrt(1 + sig[0] ** 2)), np.zeros_like(m)])
    for i in range(len(tau)):
        d = (P - ve_denoiser(P, sig[i], m, s)) / sig[i]
        P_next = P + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] > 0:
            d_next = (P_next - ve_denoiser(P_next, sig[i + 1], m, s)) / sig[i + 1]
            P_next = P + (sig[i + 1] - sig[i]) * (d + d_next) / 2
        P = P_next
    return P  # at sigma = 0, x = x~


def exact_solver_map(ab, name, tau, m, s):
    if name == "heun":
        return exact_heun_map(ab, tau, m, s)
    return exact_dpmpp_2m_map(ab, tau, m, s)


def exact_flow_map(ab, t_first, t_last, m, s):
    """x_T (at t_first) -> the exact probability-flow ODE solution at t_last, then x0_hat there (the
    last update of every sampler here). For x0 ~ N(m, s^2) the VE marginal is N(m, s^2 + sigma^2), so
    dx~/dsigma = (x~ - D)/sigma = sigma (x~ - m)/(s^2 + sigma^2), solved by (x~ - m)/sqrt(s^2 + sigma^2)
    = const: x~_last - m = (x_T/alpha_first - m) sqrt((s^2 + sigma_last^2)/(s^2 + sigma_first^2)),
    whatever the path in sigma (the discrete table enters only through the two endpoint levels)."""
    sf2, sl2 = (1 - ab[t_first]) / ab[t_first], (1 - ab[t_last]) / ab[t_last]
    g = s**2 / np.sqrt((s**2 + sl2) * (s**2 + sf2))
    return np.vstack([g / np.sqrt(ab[t_first]), m * (1 - g)])


def affine_map_of(fn, d, name, steps, spacing, m=M, s=S):
    """(A, B) of the torch sampler itself, in float64: its outputs at x_T = 0 and x_T = 1."""
    oracle = GaussianOracle(d.alphas_cumprod.numpy(), m, s, d.config.prediction)
    x_T = torch.tensor([[0.0] * len(m), [1.0] * len(m)], dtype=torch.float64)
    out = fn(d, oracle, x_T.shape, steps=steps, spacing=spacing, x_T=x_T, clip_x0=None, progress=False,
             dtype=torch.float64).numpy()
    return np.vstack([out[1] - out[0], out[0]])


# ---------------------------------------------------------------------------------------------
# (a) output distribution with the exact denoiser


MOMENT_CASES = [  # (schedule, sampler, steps, spacing)
    ("cosine", "dpm++2m", 10, "logsnr"),
    ("linear", "dpm++2m", 15, "trailing"),
    ("linear", "dpm++2m", 8, "karras"),
    ("cosine", "heun", 19, "karras"),
    ("linear", "heun", 20, "trailing"),  # 10 levels, 19 calls
]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("schedule,name,steps,spacing", MOMENT_CASES)
def test_oracle_samples_have_the_solvers_exact_output_distribution(schedule, name, steps, spacing, prediction):
    """20k float32 samples through ``sample`` match N(B, A^2), (A, B) the numpy recursion of the paper's
    algorithm on the same grid, within 4.5 SE (the output is exactly Gaussian, so this is the only error)."""
    d = make(T=1000, schedule=schedule, prediction=prediction)
    oracle = GaussianOracle(d.alphas_cumprod.numpy(), M, S, prediction)
    x = sample(d, oracle, (N_SAMPLES, 4), SamplerConfig(name, steps, spacing=spacing),
               generator=torch.Generator().manual_seed(0), clip_x0=None)
    A, B = exact_solver_map(d.alphas_cumprod.numpy(), name, grid(d, name, steps, spacing), M, S)
    assert_moments(x, B, A**2)


@pytest.mark.parametrize("name", ["dpm++2m", "heun"])
def test_exact_output_moments_approach_the_data_moments(name):
    """The exact output N(B, A^2) (default spacing) nears the data N(m, s^2) as the network calls grow:
    at ~100 calls (Heun 99) the variance is within 2% and the mean within 2e-3, and for s >= 0.3 the
    variance error is smaller than at 10 calls (Heun 9). What is left in the limit is the exact flow's:
    the last update's x0_hat at t = 0 (variance s^4/(s^2 + sigma_0^2): 1% low for s = 0.1 on the linear
    schedule) and the N(0, I) prior's mismatch."""
    for schedule in ("linear", "cosine"):
        d = make(T=1000, schedule=schedule)
        ab = d.alphas_cumprod.numpy()
        errors = []
        for calls in (10, 100):
            steps = calls - 1 if name == "heun" else calls
            A, B = exact_solver_map(ab, name, grid(d, name, steps, SAMPLER_SPACINGS[name][0]), M, S)
            errors.append(np.abs(A**2 / S**2 - 1))
        assert np.all(errors[1] < 0.02) and np.all(np.abs(B - M) < 2e-3), (errors[1], B - M)
        assert np.all((errors[1] < errors[0])[S >= 0.3]), errors
        A, B = exact_flow_map(ab, grid(d, name, 99, SAMPLER_SPACINGS[name][0])[0], 0, M, S)
        np.testing.assert_allclose(A**2, S**4 / (S**2 + (1 - ab[0]) / ab[0]), rtol=2e-4)


def test_torch_solvers_equal_their_numpy_recursions():
    """The affine maps of the torch code (float64) equal those of the numpy recursions to 1e-10,
    for every parameterization (so the three network outputs are read identically)."""
    for prediction in ("eps", "x0", "v"):
        d = make(T=1000, schedule="cosine", prediction=prediction)
        ab = d.alphas_cumprod.numpy()
        for name, steps, spacing in [("dpm++2m", 12, "logsnr"), ("dpm++2m", 9, "trailing"), ("heun", 15, "karras")]:
            got = affine_map_of(SOLVERS[name], d, name, steps, spacing)
            ref = exact_solver_map(ab, name, grid(d, name, steps, spacing), M, S)
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * (1 + np.abs(ref).max()))


# ---------------------------------------------------------------------------------------------
# (b) order of convergence against the exact ODE solution


ORDER_CASES = [  # (sampler, spacing, schedule, order)
    ("ddim", "trailing", "cosine", 1),
    ("dpm++2m", "logsnr", "cosine", 2),
    ("dpm++2m", "karras", "linear", 2),
    ("heun", "karras", "cosine", 2),
    ("heun", "logsnr", "linear", 2),
]


@pytest.mark.parametrize("name,spacing,schedule,order", ORDER_CASES)
def test_error_falls_at_the_solvers_order(name, spacing, schedule, order):
    """max |(A, B) - (A, B)_exact| against the exact ODE map between the grid's first and last level
    (exact_flow_map: same endpoints, so only the discretization error remains) for N = 16, 32, 64, 128
    grid points (Heun: levels, 2N - 1 calls); the least-squares slope of log error vs log N is the
    order: 1 for DDIM (DPM-Solver-1), 2 for DPM-Solver++(2M) and Heun. The grids are the production
    integer ones; their rounding does not spoil the order (both solvers take variable steps)."""
    d = make(T=1000, schedule=schedule)
    ab = d.alphas_cumprod.numpy()
    ns = np.array([16, 32, 64, 128])
    errors = []
    for n in ns:
        steps = 2 * n - 1 if name == "heun" else n
        tau = grid(d, name, steps, spacing)
        got = affine_map_of(SOLVERS[name], d, name, steps, spacing)
        errors.append(np.abs(got - exact_flow_map(ab, tau[0], tau[-1], M, S)).max())
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert order - 0.2 <= slope <= order + 0.3, (slope, errors)
    assert errors[-1] < (2e-2 if order == 1 else 1e-3), errors


# ---------------------------------------------------------------------------------------------
# (c) step-for-step agreement with diffusers

DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# diffusers 0.42.1 calls np.array(tensor) the way numpy 2 deprecates; harmless here
quiet_diffusers = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _test_net(d):
    """The oracle plus a nonlinear, t-dependent term: any model output works for a step-for-step check."""
    oracle = GaussianOracle(d.alphas_cumprod.numpy(), M, S, d.config.prediction)
    return lambda x, t: oracle(x, t) + 0.1 * torch.tanh(2 * x + t.double().unsqueeze(1) / d.num_timesteps)


def _recording(net):
    inputs = []

    def fn(x, t):
        inputs.append((x.clone(), t.clone()))
        return net(x, t)

    return fn, inputs


def _float32_x_T(n=64):
    """x_T exactly representable in float32, so that diffusers' cast of the sample to float32 (in
    DPMSolverMultistepScheduler.step) is exact at the first step, where eps -> x0 divides by alpha_T."""
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(0)).double()


@quiet_diffusers
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_dpmpp_2m_matches_diffusers_step_for_step(schedule, prediction):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, lower_order_final,
    final_sigmas_type "zero", our betas and float64 alpha_bar/sigma tables) run on the same model from
    the same x_T: every network input (timestep and x) and the final sample agree. "trailing" uses
    diffusers' own timestep_spacing; "logsnr"/"karras" grids are handed over as custom timesteps.
    Tolerance: step() rounds the sample to float32 (2^-24 relative) before each update, and the
    update does not amplify it (|sigma_{i+1}/sigma_i| <= 1 on x), so |diff| <= 2 steps 2^-24 max|x|."""
    diffusers = pytest.importorskip("diffusers")
    d = make(T=1000, schedule=schedule, prediction=prediction)
    net, ac = _test_net(d), d.alphas_cumprod
    x_T = _float32_x_T()
    for steps, spacing in [(10, "trailing"), (25, "trailing"), (10, "logsnr"), (20, "logsnr"), (7, "karras")]:
        fn, ours = _recording(net)
        out = dpmpp_2m_sample(d, fn, x_T.shape, steps=steps, spacing=spacing, x_T=x_T, clip_x0=None,
                              progress=False, dtype=torch.float64)
        t = solver_timesteps(d, steps, spacing)
        sched = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, trained_betas=d.betas.numpy(), solver_order=2, algorithm_type="dpmsolver++",
            solver_type="midpoint", prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing="trailing",
            lower_order_final=True, final_sigmas_type="zero")
        sched.alphas_cumprod = ac.clone()
        if spacing == "trailing":
            sched.set_timesteps(steps)
        else:
            sched.set_timesteps(timesteps=t.tolist())
        assert sched.timesteps.tolist() == t.tolist()
        sigmas = torch.cat([((1 - ac[t]) / ac[t]).sqrt(), torch.zeros(1, dtype=torch.float64)])
        torch.testing.assert_close(sched.sigmas.double(), sigmas, rtol=1e-6, atol=0)  # its float32 copy
        sched.sigmas = sigmas
        x, theirs = x_T.clone(), []
        for tt in sched.timesteps:
            theirs.append(x.clone())
            x = sched.step(net(x, tt.expand(len(x))), tt, x).prev_sample
        assert len(ours) == len(theirs) == steps
        tol = 2 * steps * 2**-24 * max(v.abs().max().item() for v in theirs)
        for i, ((x_ours, t_ours), x_theirs) in enumerate(zip(ours, theirs)):
            assert torch.equal(t_ours, t[i].expand(len(x_T)))
            torch.testing.assert_close(x_ours, x_theirs, rtol=0, atol=tol, msg=f"{spacing} {steps}: step {i}")
        torch.testing.assert_close(out, x, rtol=0, atol=tol)


@quiet_diffusers
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_heun_matches_diffusers_step_for_step(schedule, prediction):
    """diffusers' HeunDiscreteScheduler is Karras et al.'s Algorithm 1 in the VE state x~ = x/alpha
    (model input x~/sqrt(sigma^2 + 1), fractional timesteps unless given). Given our integer levels as
    custom timesteps and float64 sigmas, all its 2N - 1 network inputs (ours: x = alpha x~, including
    the Euler predictor points) and its final x~ at sigma = 0 agree to float64 rounding of a state of
    size sigma_0 (<= 2e4): 1e-12 sigma_0."""
    diffusers = pytest.importorskip("diffusers")
    d = make(T=1000, schedule=schedule, prediction=prediction)
    net, ac = _test_net(d), d.alphas_cumprod
    x_T = _float32_x_T()
    for steps, spacing in [(9, "karras"), (19, "trailing"), (20, "logsnr")]:
        fn, ours = _recording(net)
        out = heun_sample(d, fn, x_T.shape, steps=steps, spacing=spacing, x_T=x_T, clip_x0=None, progress=False,
                          dtype=torch.float64)
        t = solver_timesteps(d, heun_levels(steps), spacing)
        sched = diffusers.HeunDiscreteScheduler(num_train_timesteps=1000, trained_betas=d.betas.numpy(),
                                                prediction_type=DIFFUSERS_PREDICTION[prediction])
        sched.alphas_cumprod = ac.clone()
        sched.set_timesteps(timesteps=t.tolist())
        sigma = torch.cat([((1 - ac[t]) / ac[t]).sqrt(), torch.zeros(1, dtype=torch.float64)])
        sigmas = torch.cat([sigma[:1], sigma[1:-1].repeat_interleave(2), sigma[-1:]])
        torch.testing.assert_close(sched.sigmas.double(), sigmas, rtol=1e-6, atol=0)
        sched.sigmas = sigmas
        x, theirs = x_T * (1 + sigma[0] ** 2).sqrt(), []
        for tt in sched.timesteps:
            x_in = sched.scale_model_input(x, tt)
            theirs.append((x_in, tt))
            x = sched.step(net(x_in, tt.long().expand(len(x))), tt, x).prev_sample
        assert len(ours) == len(theirs) == 2 * len(t) - 1 == 2 * heun_levels(steps) - 1
        tol = 1e-12 * sigma[0].item()
        for i, ((x_ours, t_ours), (x_theirs, t_theirs)) in enumerate(zip(ours, theirs)):
            assert torch.equal(t_ours, t_theirs.long().expand(len(x_T)))
            torch.testing.assert_close(x_ours, x_theirs, rtol=0, atol=tol, msg=f"{spacing} {steps}: call {i}")
        torch.testing.assert_close(out, x, rtol=0, atol=tol)


@quiet_diffusers
def test_spacings_match_diffusers_grids():
    """Linear schedule (t_max = T-1): "logsnr" is diffusers' use_lu_lambdas, "karras" its
    use_karras_sigmas (both rounded to integer t), "trailing" its timestep_spacing="trailing". Where
    diffusers' rounding gives a repeated timestep (logsnr, 50 steps, near t = 0) ours are pushed apart."""
    diffusers = pytest.importorskip("diffusers")
    d = make(T=1000, schedule="linear")

    def theirs(steps, **kw):
        sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=d.betas.numpy(), **kw)
        sched.alphas_cumprod = d.alphas_cumprod.clone()
        sched.set_timesteps(steps)
        return sched.timesteps.tolist()

    for steps in (1, 2, 5, 10, 20, 30):
        assert solver_timesteps(d, steps, "logsnr").tolist() == theirs(steps, use_lu_lambdas=True)
        assert solver_timesteps(d, steps, "karras").tolist() == theirs(steps, use_karras_sigmas=True)
        assert solver_timesteps(d, steps, "trailing").tolist() == theirs(steps, timestep_spacing="trailing")
    ours, ref = solver_timesteps(d, 50, "logsnr").tolist(), theirs(50, use_lu_lambdas=True)
    assert len(set(ref)) < 50 and ours[:-6] == ref[:-6] and ours[-6:] == [5, 4, 3, 2, 1, 0]


# ---------------------------------------------------------------------------------------------
# grids, config, dispatch, network calls


def test_solver_timesteps_are_distinct_descending_integers_from_t_max_to_0():
    for schedule, t_max in (("linear", 999), ("cosine", 995)):  # cosine: lambda_996 = -5.37 < -5.1
        d = make(T=1000, schedule=schedule)
        for spacing in ("logsnr", "karras"):
            for steps in (1, 2, 3, 7, 50, 200, 1000):
                t = solver_timesteps(d, steps, spacing)
                assert t.dtype == torch.long and len(t) == steps and bool((t.diff() < 0).all())
                assert t[0] == (t_max if steps < 1000 else 999) and t[-1] == (0 if steps > 1 else t_max)
        assert solver_timesteps(d, 10, "trailing").tolist() == ddim_timesteps(1000, 10).tolist()
    d = make(T=1000, schedule="cosine")
    # the clipped last beta: from sigma_{T-1} = 2e4, karras would put 6 of 10 levels at t >= 994
    assert (solver_timesteps(d, 10, "karras") >= 994).sum() == 1


def _counting(net):
    calls = []
    return (lambda x, t: calls.append(t) or net(x, t)), calls


@pytest.mark.parametrize("name,steps,calls", [("ddim", 7, 7), ("ddpm", 7, 50), ("dpm++2m", 7, 7), ("heun", 7, 7),
                                              ("heun", 8, 7), ("heun", 1, 1), ("dpm++2m", 1, 1)])
def test_network_calls_per_sample(name, steps, calls):
    d = make(T=50, schedule="linear", beta_end=0.2)
    config = SamplerConfig(name, steps)
    assert config.network_calls(50) == calls
    fn, seen = _counting(GaussianOracle(d.alphas_cumprod.numpy(), M, S))
    x = sample(d, fn, (3, 4), config, generator=torch.Generator().manual_seed(0), clip_x0=None)
    assert len(seen) == calls and torch.isfinite(x).all()


def test_default_spacings_describe_and_unchanged_ddim():
    assert SamplerConfig().resolved_spacing() == "trailing"
    assert {n: SamplerConfig(n).resolved_spacing() for n in SAMPLER_SPACINGS} == {
        "ddim": "trailing", "ddpm": None, "dpm++2m": "logsnr", "heun": "karras"}
    assert SamplerConfig().describe(1000) == "DDIM, 50 steps (trailing), eta 0.0"
    assert SamplerConfig("ddpm").describe(1000) == "DDPM ancestral, 1000 steps"
    assert SamplerConfig("dpm++2m", 20).describe(1000) == "DPM-Solver++(2M), 20 steps (logsnr)"
    assert SamplerConfig("heun", 20, spacing="trailing").describe(1000) == (
        "Heun (Karras et al. Alg. 1), 10 noise levels (trailing), 19 network calls")
    # the dispatcher's DDIM is ddim_sample with the recorded spacing, bit for bit
    d = make(T=200)
    oracle = GaussianOracle(d.alphas_cumprod.numpy(), M, S)
    for spacing in ("default", "leading"):
        a = sample(d, oracle, (50, 4), SamplerConfig(steps=20, eta=1.0, spacing=spacing),
                   generator=torch.Generator().manual_seed(3), clip_x0=(-1.0, 1.0))
        b = ddim_sample(d, oracle, (50, 4), steps=20, eta=1.0, spacing="trailing" if spacing == "default" else spacing,
                        generator=torch.Generator().manual_seed(3), progress=False)
        assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [dpmpp_2m_sample, heun_sample])
def test_generator_draws_only_x_T_and_clipping_bounds_the_output(fn):
    d = make(T=200)
    oracle = GaussianOracle(d.alphas_cumprod.numpy(), [3.0], [0.5])
    kw = dict(shape=(500, 1), steps=9, progress=False)
    x_T = gaussian_noise((500, 1), torch.Generator().manual_seed(4), torch.device("cpu"), torch.float32)
    free = fn(d, oracle, generator=torch.Generator().manual_seed(4), clip_x0=None, **kw)
    assert torch.equal(free, fn(d, oracle, x_T=x_T, generator=torch.Generator().manual_seed(9), clip_x0=None, **kw))
    assert abs(free.mean().item() - 3.0) < 0.1
    clipped = fn(d, oracle, x_T=x_T, **kw)
    assert clipped.min() >= -1 and clipped.max() <= 1
    narrow = fn(d, oracle, x_T=x_T, clip_x0=(-0.5, 0.25), **kw)
    assert narrow.min() >= -0.5 and narrow.max() <= 0.25


@pytest.mark.parametrize("name,steps,eta", [("ddpm", 1, 1.0), ("ddim", 12, 0.0), ("ddim", 12, 1.0),
                                           ("dpm++2m", 9, 0.0), ("heun", 9, 0.0)])
def test_step_callback_sees_the_trajectory_and_changes_nothing(name, steps, eta):
    """The callback is called once per grid timestep (Heun: per level) with the timestep, the state the
    network read and its (clipped) x0_hat; the first state is x_T, the last x0_hat is the sample, and
    the output and the noise drawn are those of the same run without a callback."""
    d = make(T=50)
    oracle = GaussianOracle(d.alphas_cumprod.numpy(), M, S)
    config = SamplerConfig(name, steps, eta)
    seen = []
    run = [sample(d, oracle, (64, 4), config, generator=torch.Generator().manual_seed(5), clip_x0=(-1.0, 1.0),
                  callback=cb) for cb in (None, lambda t, x, x0: seen.append((t, x.clone(), x0.clone())))]
    assert torch.equal(run[0], run[1])
    expected_t = list(range(49, -1, -1)) if name == "ddpm" else grid(d, name, steps, config.resolved_spacing()).tolist()
    assert [t for t, _, _ in seen] == expected_t
    x_T = gaussian_noise((64, 4), torch.Generator().manual_seed(5), torch.device("cpu"), torch.float32)
    assert torch.equal(seen[0][1], x_T)
    assert all(x0.abs().max() <= 1 for _, _, x0 in seen)  # what the sampler used: clipped
    # the sampler's last update returns x0_hat (DDPM: posterior mean coefficients 1 and 0 at t = 0, up to rounding)
    torch.testing.assert_close(seen[-1][2], run[0], rtol=0, atol=1e-6)
    # with the oracle the early x0_hat are near the data mean, the last ones spread like the data
    assert seen[0][2].std(0).mean() < seen[-1][2].std(0).mean()


# ---------------------------------------------------------------------------------------------
# (d) argument errors


@pytest.mark.parametrize("fields,match", [
    ({"name": "euler"}, r"name must be one of \['ddim', 'ddpm', 'dpm\+\+2m', 'heun'\], got 'euler'"),
    ({"name": "heun", "spacing": "leading"}, r"spacing 'leading' is not available for heun; use 'default' \(karras\)"),
    ({"name": "ddim", "spacing": "logsnr"}, r"spacing 'logsnr' is not available for ddim"),
    ({"name": "dpm++2m", "spacing": "linspace"}, r"spacing 'linspace' is not available for dpm\+\+2m"),
    ({"name": "dpm++2m", "eta": 0.5}, r"eta applies to DDIM only \(dpm\+\+2m is deterministic\)"),
    ({"name": "heun", "steps": 0}, r"steps must be >= 1, got 0"),
    ({"name": "dpm++2m", "steps": 201}, r"steps \(201\) must be <= diffusion.num_timesteps \(200\)"),
])
def test_sampler_config_errors(fields, match):
    config = SamplerConfig(**fields)
    with pytest.raises(GenbenchError, match=match):
        config.validate(200)
    with pytest.raises(GenbenchError, match=match):  # sample() validates before it runs
        sample(make(T=200), lambda x, t: x, (2, 4), config)


def test_config_file_and_solver_argument_errors():
    with pytest.raises(GenbenchError, match="is not one of"):
        from_dict(SamplerConfig, {"name": "dpm++3m"})
    with pytest.raises(GenbenchError, match="is not one of"):
        from_dict(SamplerConfig, {"spacing": "quadratic"})
    assert from_dict(SamplerConfig, {"name": "heun", "steps": 35, "spacing": "karras"}).network_calls(1000) == 35
    d, net = make(T=200), (lambda x, t: x)
    for fn in (dpmpp_2m_sample, heun_sample):
        with pytest.raises(GenbenchError, match=r"solver steps must be in \[1, num_timesteps=200\], got 0"):
            fn(d, net, (2, 4), steps=0, progress=False)
        with pytest.raises(GenbenchError, match="spacing must be 'trailing', 'logsnr' or 'karras', got 'leading'"):
            fn(d, net, (2, 4), spacing="leading", progress=False)
    with pytest.raises(GenbenchError, match=r"solver steps must be in \[1, num_timesteps=200\], got 201"):
        dpmpp_2m_sample(d, net, (2, 4), steps=201, progress=False)
