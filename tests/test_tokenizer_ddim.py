"""The bundled CLIP vocabulary, and DDIM against the paper's equations and diffusers' scheduler."""
import warnings

import pytest
import torch
from diffusers import DDIMScheduler

from sdlens.schedulers import DDIMConfig, alphas_cumprod, ddim_step, invert, sample, timesteps
from sdlens.weights.load import TOKENIZER_DIR, _tokenizer


def test_real_clip_vocabulary():
    tok = _tokenizer(TOKENIZER_DIR)
    assert len(tok) == 49408
    assert tok("a photo of a cat riding a bicycle").input_ids == [49406, 320, 1125, 539, 320, 2368, 6765, 320, 11652, 49407]
    sd1 = tok("a cat", padding="max_length", max_length=77).input_ids
    sd2 = _tokenizer(TOKENIZER_DIR, "!")("a cat", padding="max_length", max_length=77).input_ids
    assert sd1[4:] == [49407] * 73 and sd2[4:] == [0] * 73  # SD 1 pads with <|endoftext|>, SD 2 with "!"


def test_long_prompt_is_truncated_with_warning(fixture):
    import sdlens
    sd = sdlens.load(fixture["folder"])
    with pytest.warns(UserWarning, match="truncated"):
        ids = sd.tokenize(["cat " * 100])
    assert ids.shape == (1, 77) and ids[0, -1].item() == 49407
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd.tokenize(["a short prompt"])


def diffusers_ddim(prediction_type="epsilon"):
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


@pytest.mark.parametrize("steps", [1, 10, 50, 999])
def test_timesteps_leading(steps):
    ref = diffusers_ddim()
    ref.set_timesteps(steps)
    assert timesteps(DDIMConfig(), steps) == ref.timesteps.tolist()


def test_timesteps_hand_values():
    assert timesteps(DDIMConfig(), 50)[:3] == [981, 961, 941] and timesteps(DDIMConfig(), 50)[-1] == 1


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_step_matches_diffusers(pred, eta):
    cfg, ref = DDIMConfig(prediction_type=pred), diffusers_ddim(pred)
    ref.set_timesteps(20)
    acp = alphas_cumprod(cfg)
    torch.testing.assert_close(acp, ref.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x, out, noise = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    for t in (981, 501, 1):  # the last one uses the final alpha (set_alpha_to_one False -> a_0)
        ours = ddim_step(cfg, acp, out, t, t - 50, x, eta, noise)
        theirs = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_step_by_hand():
    """eps-prediction, eta 0, from a_t and a_prev computed by hand: x_prev = sqrt(a') x0 + sqrt(1-a') eps."""
    acp = alphas_cumprod(DDIMConfig())
    a, ap = acp[501].item(), acp[481].item()
    x, eps = torch.tensor([1.0]), torch.tensor([0.5])
    x0 = (1.0 - (1 - a) ** 0.5 * 0.5) / a ** 0.5
    expect = ap ** 0.5 * x0 + (1 - ap) ** 0.5 * 0.5
    assert abs(ddim_step(DDIMConfig(), acp, eps, 501, 481, x).item() - expect) < 1e-6


def test_inversion_inverts_sampling_exactly_for_constant_eps():
    """Each inversion step is the exact inverse of a DDIM step when the prediction does not change."""
    cfg = DDIMConfig()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    xs = invert(lambda x, t, step: eps, x0, cfg, 25)
    assert len(xs) == 26 and (xs[-1] - x0).abs().max() > 0.5
    torch.testing.assert_close(sample(lambda x, t, step: eps, xs[-1], cfg, 25), x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_inversion_error_vanishes_with_steps(pred):
    """For the ideal denoiser of one data point, inversion uses the prediction one step late
    (DDIM sec. 4.3), so the round trip is only exact in the limit: the error must shrink ~1/steps."""
    cfg = DDIMConfig(prediction_type=pred)
    acp = alphas_cumprod(cfg)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def model(x, t, step):
        a = acp[t].item()
        eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
        return eps if pred == "epsilon" else a ** 0.5 * eps - (1 - a) ** 0.5 * x0

    err = {n: (sample(model, invert(model, x0, cfg, n)[-1], cfg, n) - x0).abs().max().item() for n in (10, 200)}
    assert err[200] < err[10] / 5 and err[200] < 0.01, err


def test_steps_past_the_schedule_are_refused():
    """SD's leading spacing with steps_offset 1 at 1000 steps would start at t = 1000, which does not
    exist (diffusers' DDIMScheduler indexes past its table there); 999 is the most that fits."""
    with pytest.raises(ValueError, match="steps=1000 .*at most 999 steps"):
        timesteps(DDIMConfig(), 1000)
    assert timesteps(DDIMConfig(), 999)[0] == 999


def test_1000_steps_without_offset_match_diffusers():
    """steps_offset 0, 1000 steps: timesteps 999..0, and the last step goes to t_prev = -1 (the final
    alpha). Oracle: diffusers' DDIMScheduler over the whole chain, at eta 0 (our `sample`) and eta 1."""
    cfg = DDIMConfig(steps_offset=0)
    acp = alphas_cumprod(cfg)
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    noises = torch.randn(1000, 1, 4, 4, 4, generator=g)
    model = lambda x, t, step: (x - acp[t] ** 0.5 * x0) / (1 - acp[t]) ** 0.5  # the ideal denoiser of x0
    for eta in (0.0, 1.0):
        ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                            set_alpha_to_one=False, steps_offset=0)
        ref.set_timesteps(1000)
        assert timesteps(cfg, 1000) == ref.timesteps.tolist() == list(range(999, -1, -1))
        theirs = x
        for i, t in enumerate(ref.timesteps):
            theirs = ref.step(model(theirs, t, i), t, theirs, eta=eta, variance_noise=noises[i]).prev_sample
        if eta == 0:
            ours = sample(model, x, cfg, 1000)
        else:
            ours = x
            for i, t in enumerate(timesteps(cfg, 1000)):
                ours = ddim_step(cfg, acp, model(ours, t, i), t, t - 1, ours, eta, noises[i])
        assert not ours.is_complex()
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [1.5, -0.1, float("nan")])
def test_eta_outside_0_1_is_refused(eta):
    """Beyond 1, 1 - a_prev - sigma^2 < 0 and the latents went complex (eq. 12); NaN passed silently."""
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="eta must be between 0"):
        sample(lambda x, t, step: x, x, DDIMConfig(), 5, eta=eta)
    with pytest.raises(ValueError, match="eta must be between 0"):
        ddim_step(DDIMConfig(), alphas_cumprod(DDIMConfig()), x, 501, 481, x, eta)
