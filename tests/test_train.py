"""The training script's three modes on a few steps: from scratch, a VAE fine-tune, a resume.
Not quality (that is bench/tiny_quality.py), but the bookkeeping a shipped model depends on:
latents scaled to unit variance, stages that leave the other parts untouched, the history kept."""
import json
import random

import pytest
import torch

import sdlens
from sdlens.tiny.train import batch_images, main

SMALL = ["--scenes", "64", "--vae-batch", "4", "--unet-batch", "4", "--threads", "0"]


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def latent_std(sd, seed):
    x, _ = batch_images(random.Random(seed + 1), 64)  # the scenes train.encode_dataset uses
    with torch.no_grad():
        return sd.vae.encode(x)[0].std().item()


def test_train_finetune_vae_and_resume(tmp_path):
    first, tuned, resumed = (str(tmp_path / n) for n in ("first", "tuned", "resumed"))
    main(["--out", first, "--vae-steps", "3", "--unet-steps", "2", *SMALL])
    a = sdlens.load(first)
    # LDM sec. 4.3.2: the scaling factor makes the UNet's latents unit-variance (to 2e-3: the
    # folder stores fp16 weights; a factor left stale by a VAE fine-tune is off by ~10%)
    assert a.vae.cfg.scaling_factor * latent_std(a, 0) == pytest.approx(1, abs=2e-3)
    with pytest.raises(SystemExit, match="exists"):
        main(["--out", first, "--vae-steps", "1", "--unet-steps", "1", *SMALL])

    main(["--finetune-vae", first, "--out", tuned, "--vae-steps", "2", "--vae-lr", "5e-4",
          "--edge-weight", "1", "--seed", "3", *SMALL])
    b = sdlens.load(tuned)
    assert not equal(state(a.vae), state(b.vae))
    assert equal(state(a.unet), state(b.unet)) and equal(state(a.text_encoder), state(b.text_encoder))
    assert b.vae.cfg.scaling_factor * latent_std(b, 3) == pytest.approx(1, abs=2e-3)
    with open(f"{tuned}/training.json") as f:
        stats = json.load(f)
    with open(f"{first}/training.json") as f:
        assert stats["previous_stage"] == json.load(f) and stats["args"]["edge_weight"] == 1

    main(["--resume", tuned, "--out", resumed, "--unet-steps", "2", "--decoder-steps", "0", *SMALL])
    c = sdlens.load(resumed)
    assert equal(state(b.vae), state(c.vae)) and c.vae.cfg.scaling_factor == b.vae.cfg.scaling_factor
    assert not equal(state(b.unet), state(c.unet))
