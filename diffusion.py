"""Gaussian diffusion: beta schedules, forward process, eps-prediction loss, DDPM/DDIM samplers, CFG.

Implements the per-level diffusion of the paper (shared/paper.md §4-§5):
- Eq. 3 of the paper: every level D_theta_l is trained with the eps-prediction loss at a uniform discrete
  timestep, T = 1000, "stable-diffusion" scaled-linear betas (the U-ViT default, paper.md §4.2).
- Forward process q(x_t | x_0) (Ho et al. 2020, Eq. 4) and posterior q(x_{t-1} | x_t, x_0) (Ho Eq. 6-7).
- Samplers on an evenly respaced subset of timesteps (Nichol & Dhariwal 2021, "improved DDPM", §4):
  ancestral DDPM (Ho Alg. 2), DDIM (Song et al. 2021, Eq. 12; eta=0 deterministic, eta=1 = DDPM) and
  DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), the paper's sampler (U-ViT's DPM-Solver++, 50 steps,
  paper.md §5) and our default.
- Classifier-free guidance eps_c + w (eps_c - eps_u) (paper.md §5, U-ViT convention, w=0: no guidance), with one
  weight per level (``cfg_weights``, paper §4.2).
- What the network predicts: eps (the paper's) or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022,
  §4, "v-parameterisation"; not in the paper). The eps loss weights the x0 error by the SNR, which is ~0 near
  t = T, exactly where a level's conditions decide the sample; the v loss weights it by 1 + SNR. Samplers and
  guidance see eps either way (``to_eps``: exact and linear, so guiding v equals guiding eps).
- Training timesteps: uniform, the paper's, or of density proportional to (t/T)^k (``skewed_timesteps``,
  train.py --t-skew; not in the paper).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import UsageError

SCHEDULES = ("linear", "scaled_linear", "cosine")
SAMPLERS = ("dpm++", "ddim", "ddpm")
PREDICTIONS = ("eps", "v")
# sample.py's guidance weights without --cfg, top-down (paper §4.2: larger at the top)
CFG_DEFAULTS = {"none": [0.8], "class": [0.5, 0.4, 0.3, 0.2, 0.1], "text": [1.0]}


def make_betas(schedule: str, T: int = 1000) -> np.ndarray:
    """float64 betas (T,): "linear" (Ho et al.: 1e-4 -> 0.02), "scaled_linear" (Stable Diffusion / U-ViT,
    the paper's), "cosine" (Nichol & Dhariwal Eq. 17, s = 0.008, betas clipped at 0.999)."""
    if schedule == "linear":
        return np.linspace(1e-4, 0.02, T, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * math.pi / 2) ** 2  # abar(t/T), t=0..T
        return np.minimum(1 - f[1:] / f[:-1], 0.999)
    raise UsageError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _randn(shape, generator, device):
    """Standard normal noise drawn on the generator's device (reproducible), moved to `device`."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def skewed_timesteps(u, T, skew):
    """Training timesteps of density proportional to (t/T)^skew on {0..T-1} from uniform u in [0, 1) (B,): t =
    floor(T u^(1/(skew+1))), whose CDF is (t/T)^(skew+1), for skew > -1. skew = 0 is the paper's uniform t; skew > 0
    puts more of the training on the noisy timesteps, where a level's conditions decide its sample, skew < 0 on the
    nearly clean ones (train.py --t-skew; not in the paper)."""
    return (T * u ** (1.0 / (skew + 1))).long().clamp_(0, T - 1)


def predict_x0(x_t, eps, abar_t, clip):
    """x0 from x_t and eps by inverting Ho Eq. 4; clamp to [-clip, clip] when clip is set."""
    x0 = (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    return x0 if clip is None else x0.clamp(-clip, clip)


def ddpm_step(x_t, eps, abar_t, abar_prev, noise, clip=None):
    """One ancestral step (Ho et al. Alg. 2) between two kept timesteps of a respaced schedule.

    beta = 1 - abar_t / abar_prev is the respaced beta. The mean is the posterior mean (Ho Eq. 7) at the
    predicted x0, which equals Alg. 2's 1/sqrt(alpha) (x_t - beta / sqrt(1 - abar_t) eps) when clip is None;
    the std is sqrt(beta_tilde) (Ho Eq. 7, the "fixed small" choice), zero at the last step (abar_prev = 1).
    """
    alpha = abar_t / abar_prev
    beta = 1 - alpha
    x0 = predict_x0(x_t, eps, abar_t, clip)
    mean = (math.sqrt(abar_prev) * beta * x0 + math.sqrt(alpha) * (1 - abar_prev) * x_t) / (1 - abar_t)
    var = (1 - abar_prev) / (1 - abar_t) * beta
    return mean + math.sqrt(var) * noise


def ddim_step(x_t, eps, abar_t, abar_prev, eta, noise, clip=None):
    """One DDIM step (Song et al. Eq. 12) from abar_t to abar_prev:
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (Song Eq. 16).
    eta = 0: deterministic; eta = 1: the DDPM step. With clip, eps is recomputed from the clipped x0."""
    x0 = predict_x0(x_t, eps, abar_t, clip)
    if clip is not None:
        eps = (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    direction = math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps
    return math.sqrt(abar_prev) * x0 + direction + sigma * noise


def dpm_solver_step(x_t, x0, abar_t, abar_prev, x0_last=None, h_last=None):
    """One DPM-Solver++(2M) step (Lu et al. 2022, "DPM-Solver++", Alg. 2) from abar_t to abar_prev in
    log-SNR time lambda = log(alpha / sigma), alpha = sqrt(abar), sigma = sqrt(1 - abar), h = lambda_prev - lambda_t:
        x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D,
    D = x0 for the first step (first order: the same update as DDIM), else the multistep correction
    D = x0 + (x0 - x0_last) h / (2 h_last). The last step (abar_prev = 1, sigma = 0) returns x0 (first order
    at the end, as in Lu et al.'s code). Returns (x_prev, h), h feeding the next step's h_last."""
    if abar_prev >= 1.0:
        return x0, None
    lam = lambda abar: 0.5 * math.log(abar / (1 - abar))  # noqa: E731
    h = lam(abar_prev) - lam(abar_t)
    d = x0 if x0_last is None else x0 + (x0 - x0_last) * (h / (2 * h_last))
    x_prev = math.sqrt((1 - abar_prev) / (1 - abar_t)) * x_t - math.sqrt(abar_prev) * math.expm1(-h) * d
    return x_prev, h


def respaced_timesteps(T: int, steps: int) -> np.ndarray:
    """`steps` evenly spaced original timesteps from T-1 down to 0 (improved DDPM's space_timesteps)."""
    return np.round(np.linspace(T - 1, 0, steps)).astype(np.int64)


def guided_eps(eps_c, eps_u, w):
    """Classifier-free guidance eps_c + w (eps_c - eps_u) = (1 + w) eps_c - w eps_u, on all channels
    (paper.md §5; w = 0 is no guidance)."""
    return eps_c + w * (eps_c - eps_u)


def cfg_weights(cfg, cond, depth, metas=None):
    """Guidance weight of each level, top-down: one value for all, or a list (the first ``depth`` entries).
    Without --cfg a level trained with model guidance (``metas``) gets 0: its network is guided already."""
    w = cfg if cfg is not None else CFG_DEFAULTS[cond]
    w = w * depth if len(w) == 1 else w
    if len(w) < depth:
        raise UsageError(f"--cfg gives {len(w)} weights for {depth} levels; give one, or one per level top-down")
    if cfg is None and metas:
        w = [0.0 if m.get("model_guidance") else x for x, m in zip(w, metas)]
    return w[:depth]


def check_model_guidance(w, p_uncond):
    """UsageError unless 0 <= w < 1, and p_uncond > 0 where w > 0 (the nulls it guides away from are learnt from
    the dropped rows)."""
    if not 0 <= w < 1:
        raise UsageError(f"--model-guidance must be >= 0 and < 1, got {w:g}")
    if w and p_uncond == 0:
        raise UsageError("--model-guidance needs --p-uncond above 0: the null conditions it guides away from "
                         "are learnt from the rows whose conditions are dropped")


class Diffusion:
    """Discrete-time Gaussian diffusion with T steps; float32 tables indexed by t (on the CPU until .to(device))."""

    def __init__(self, schedule="scaled_linear", T=1000, prediction="eps"):
        if prediction not in PREDICTIONS:
            raise UsageError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        betas = make_betas(schedule, T)  # (T,) float64
        abar = np.cumprod(1 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.schedule, self.T, self.prediction = schedule, T, prediction
        self.betas = f32(betas)
        self.alphas_cumprod = f32(abar)
        self.alphas_cumprod_prev = f32(abar_prev)
        self.sqrt_alphas_cumprod = f32(np.sqrt(abar))
        self.sqrt_one_minus_alphas_cumprod = f32(np.sqrt(1 - abar))
        self.posterior_variance = f32(betas * (1 - abar_prev) / (1 - abar))  # beta_tilde, Ho Eq. 7
        self.posterior_mean_coef1 = f32(betas * np.sqrt(abar_prev) / (1 - abar))
        self.posterior_mean_coef2 = f32((1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar))

    def to(self, device):
        """The tables on ``device`` (train.py: no host-to-device copy, so no synchronisation, per step)."""
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self

    @staticmethod
    def _at(table, t, x):
        """table[t] reshaped to broadcast against x: (B, 1, ..., 1)."""
        return table.to(x.device)[t.to(x.device)].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho Eq. 4); t LongTensor (B,) in [0, T)."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x0) (Ho Eq. 6-7); variance has shape (B, 1, ..., 1)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t)

    def to_eps(self, out, x_t, t):
        """The network's output as eps: itself, or from v: eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
        if self.prediction == "eps":
            return out
        return self._at(self.sqrt_alphas_cumprod, t, out) * out + self._at(self.sqrt_one_minus_alphas_cumprod, t, out) * x_t

    def loss(self, net_fn, x0, generator=None, t=None, noise=None, guide=None):
        """Paper Eq. 3 for one level: t ~ U{0..T-1}, eps ~ N(0, I), mean of (net_fn(x_t, t) - target)^2 with
        target eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0 under v-prediction.
        t and noise may be given (train.py draws them for the global batch, so DDP matches one process).
        ``guide(x_t, t, out)``, given the prediction without its gradient, returns a term added to the target
        (train.py --model-guidance; not in the paper)."""
        gen_device = x0.device if generator is None else generator.device
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), generator=generator, device=gen_device).to(x0.device)  # (B,)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device)
        target = noise if self.prediction == "eps" else \
            self._at(self.sqrt_alphas_cumprod, t, x0) * noise - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        x_t = self.q_sample(x0, t, noise)
        out = net_fn(x_t, t)
        if guide is not None:
            target = target + guide(x_t, t, out.detach())
        return F.mse_loss(out, target)

    @torch.no_grad()
    def sample(self, net_fn, shape, steps=50, sampler="dpm++", eta=0.0, generator=None, x_T=None, clip=None,
               progress=False, device="cpu"):
        """Draw x0 of `shape` by running `sampler` ("dpm++", "ddim" or "ddpm") over `steps` respaced timesteps.

        net_fn(x_t, t) (the network: eps or v, see ``prediction``) gets t as a LongTensor (B,) of original
        timesteps in [0, T). x_T defaults to N(0, I)
        drawn from `generator`; clip clamps the predicted x0 (1.0 for pixels, None for latents)."""
        if sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= steps <= self.T:
            raise UsageError(f"sampling steps must be in [1, {self.T}], got {steps}")
        if not 0.0 <= eta <= 1.0:
            raise UsageError(f"DDIM eta must be in [0, 1], got {eta}")
        x = _randn(shape, generator, device) if x_T is None else x_T.to(device)
        ts = respaced_timesteps(self.T, steps)  # (steps,) decreasing
        abar = self.alphas_cumprod.double().cpu().numpy()
        x0_last = h_last = None  # DPM-Solver++ multistep state
        for i, t in enumerate(tqdm(ts, desc=f"{sampler} sampling", disable=not progress)):
            abar_t = float(abar[t])
            abar_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            tt = torch.full((shape[0],), int(t), dtype=torch.long, device=device)
            eps = self.to_eps(net_fn(x, tt), x, tt)
            noise = _randn(shape, generator, device) if (sampler == "ddpm" or eta > 0) else 0.0  # no allocation
            if sampler == "dpm++":
                x0 = predict_x0(x, eps, abar_t, clip)
                x, h_last = dpm_solver_step(x, x0, abar_t, abar_prev, x0_last, h_last)
                x0_last = x0
            elif sampler == "ddpm":
                x = ddpm_step(x, eps, abar_t, abar_prev, noise, clip)
            else:
                x = ddim_step(x, eps, abar_t, abar_prev, eta, noise, clip)
        return x
