"""Real-size architectures from their published configs: counts on meta, reduced-depth CPU forwards."""

import pytest
import torch

from visalign import architectures as arch
from visalign.errors import ConfigError

# Exact to the configs in visalign/architectures (README.md cites them and compares with the published sizes).
DENOISER_PARAMS = {
    "sd35-medium": 2_243_171_520,
    "flux1-dev": 11_901_408_320,
    "wan21-t2v-1.3b": 1_418_996_800,
    "wan21-t2v-14b": 14_288_491_584,
}
VAE_PARAMS = {
    "sd35-medium": 83_819_683,
    "flux1-dev": 83_819_683,
    "wan21-t2v-1.3b": 126_892_531,
    "wan21-t2v-14b": 126_892_531,
}


def test_every_architecture_is_shipped():
    assert set(arch.ARCHITECTURES) == set(DENOISER_PARAMS)
    assert arch.KNOWN_MODELS["black-forest-labs/FLUX.1-dev"] == "flux1-dev"


@pytest.mark.parametrize("name", sorted(DENOISER_PARAMS))
def test_builds_on_meta_with_the_published_parameter_count(name):
    model = arch.build(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == DENOISER_PARAMS[name]
    assert arch.parameter_count(name, "vae") == VAE_PARAMS[name]
    assert type(model).__name__ == arch.spec(name)["denoiser"]["class"]


def test_published_sizes():
    # SD3.5-M's "2.5B" counts the position table, which diffusers keeps as a buffer.
    assert round(arch.parameter_count("sd35-medium", buffers=True) / 1e9, 1) == 2.5
    assert round(DENOISER_PARAMS["flux1-dev"] / 1e9) == 12
    assert round(DENOISER_PARAMS["wan21-t2v-14b"] / 1e9) == 14
    assert arch.parameter_count("sd35-medium", "text_encoder_3") == 4_762_310_656  # T5-v1.1-XXL encoder


def test_depth_keeps_the_width_and_cuts_the_blocks():
    flux = arch.config("flux1-dev", depth=2)
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"]) == (2, 4, 24)
    sd3 = arch.config("sd35-medium", depth=3)
    assert sd3["num_layers"] == 3 and sd3["dual_attention_layers"] == [0, 1, 2]
    assert arch.num_blocks(arch.build("flux1-dev", depth=2)) == 6
    with pytest.raises(ConfigError, match="1 to 30"):
        arch.config("wan21-t2v-1.3b", depth=31)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match="sd35-medium"):
        arch.spec("sd4")
    with pytest.raises(ConfigError, match="stabilityai/stable-diffusion-3.5-medium"):
        arch.resolve("someone/my-finetune")
    assert arch.resolve("someone/my-finetune", architecture="flux1-dev") == "flux1-dev"
    assert arch.resolve("stabilityai/stable-diffusion-3.5-medium") == "sd35-medium"


def _forward(name, model):
    config = arch.spec(name)["denoiser"]["config"]
    if name.startswith("wan"):
        x = torch.randn(1, 16, 2, 4, 4)
        return model(
            hidden_states=x,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.randn(1, 8, 4096),
            return_dict=False,
        )[0], x
    if name == "flux1-dev":
        x = torch.randn(1, 16, 64)
        return model(
            hidden_states=x,
            timestep=torch.tensor([0.5]),
            encoder_hidden_states=torch.randn(1, 8, 4096),
            pooled_projections=torch.randn(1, 768),
            guidance=torch.tensor([3.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(8, 3),
            return_dict=False,
        )[0], x
    x = torch.randn(1, 16, 8, 8)
    return model(
        hidden_states=x,
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, 4096),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"]),
        return_dict=False,
    )[0], x


@pytest.mark.parametrize(
    "name",
    [
        "wan21-t2v-1.3b",
        pytest.param("sd35-medium", marks=pytest.mark.slow),
        pytest.param("flux1-dev", marks=pytest.mark.slow),
    ],
)
def test_reduced_depth_instance_runs_a_forward_on_cpu(name):
    model = arch.build(name, device="cpu", depth=1)
    assert arch.num_blocks(model) in (1, 3)
    with torch.no_grad():
        out, x = _forward(name, model)
    assert out.shape == x.shape and torch.isfinite(out).all()
    again = arch.build(name, device="cpu", depth=1)  # the seed fixes the random weights
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


@pytest.mark.slow
def test_stock_pipeline_around_the_real_architecture_runs():
    pipe = arch.build_pipeline("wan21-t2v-1.3b", depth=1)
    assert pipe.transformer.config.num_attention_heads == 12 and pipe.vae.config.base_dim == 96
    out = pipe(
        "a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        num_frames=5,
        output_type="pt",
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.frames.shape == (1, 5, 3, 32, 32)
