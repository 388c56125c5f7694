"""Real-size architectures from their published configs: counts on meta, reduced-depth CPU forwards."""

import pytest
import torch

from visalign import architectures as arch
from visalign.architectures import inputs
from visalign.errors import ConfigError

# Exact to the configs in visalign/architectures (README.md cites them and compares with the published sizes).
DENOISER_PARAMS = {
    "sd35-medium": 2_243_171_520,
    "flux1-dev": 11_901_408_320,
    "flux1-kontext-dev": 11_901_408_320,
    "flux2-dev": 32_223_281_152,
    "flux2-klein-4b": 3_875_544_576,
    "flux2-klein-9b": 9_078_581_248,
    "qwen-image": 20_430_401_088,
    "qwen-image-edit": 20_430_401_088,
    "z-image-turbo": 6_154_908_736,
    "wan21-t2v-1.3b": 1_418_996_800,
    "wan21-t2v-14b": 14_288_491_584,
    "wan22-t2v-a14b": 14_288_491_584,  # per expert (two)
    "wan22-i2v-a14b": 14_288_901_184,  # per expert (two); 36 input channels
    "wan22-ti2v-5b": 4_999_787_712,
    "hunyuan-video15-480p": 8_326_608_160,
    "hunyuan-video15-480p-i2v": 8_326_608_160,
}
VAE_PARAMS = {
    "sd35-medium": 83_819_683,
    "flux1-dev": 83_819_683,
    "flux1-kontext-dev": 83_819_683,
    "flux2-dev": 84_046_115,
    "flux2-klein-4b": 84_046_115,
    "flux2-klein-9b": 84_046_115,
    "qwen-image": 126_892_531,
    "qwen-image-edit": 126_892_531,
    "z-image-turbo": 83_819_683,
    "wan21-t2v-1.3b": 126_892_531,
    "wan21-t2v-14b": 126_892_531,
    "wan22-t2v-a14b": 126_892_531,
    "wan22-i2v-a14b": 126_892_531,
    "wan22-ti2v-5b": 704_688_668,
    "hunyuan-video15-480p": 1_260_634_115,
    "hunyuan-video15-480p-i2v": 1_260_634_115,
}
# The new families' text (and image) encoders, built on meta from the configs in their JSONs.
ENCODER_PARAMS = {
    "flux2-dev": {"text_encoder": 24_011_361_280},  # Mistral-Small-3.2-24B (Mistral3ForConditionalGeneration)
    "flux2-klein-4b": {"text_encoder": 4_022_468_096},  # Qwen3-4B, tied embeddings
    "flux2-klein-9b": {"text_encoder": 8_190_735_360},  # Qwen3-8B
    "qwen-image": {"text_encoder": 8_292_166_656},  # Qwen2.5-VL-7B with its vision tower ("8.29B")
    "z-image-turbo": {"text_encoder": 4_022_468_096},  # Qwen3-4B (Qwen3Model)
    "hunyuan-video15-480p-i2v": {
        "text_encoder": 7_070_619_136,  # Qwen2.5-VL-7B's language model
        "text_encoder_2": 219_314_944,  # ByT5-small's encoder, vocabulary 1510 (Glyph-SDXL-v2 tokens)
        "image_encoder": 428_225_600,  # SigLIP so400m/14 at 384 px
    },
}
HUB_IDS = {
    "Qwen/Qwen-Image": "qwen-image",
    "Qwen/Qwen-Image-Edit": "qwen-image-edit",
    "Qwen/Qwen-Image-Edit-2509": "qwen-image-edit",
    "black-forest-labs/FLUX.2-dev": "flux2-dev",
    "black-forest-labs/FLUX.2-klein-base-9B": "flux2-klein-9b",
    "black-forest-labs/FLUX.2-klein-9B": "flux2-klein-9b",
    "black-forest-labs/FLUX.2-klein-4B": "flux2-klein-4b",
    "black-forest-labs/FLUX.1-Kontext-dev": "flux1-kontext-dev",
    "Tongyi-MAI/Z-Image-Turbo": "z-image-turbo",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "wan22-t2v-a14b",
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": "wan22-i2v-a14b",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "wan22-ti2v-5b",
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v": "hunyuan-video15-480p",
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v": "hunyuan-video15-480p-i2v",
}


def test_every_architecture_is_shipped():
    assert set(arch.ARCHITECTURES) == set(DENOISER_PARAMS)
    assert arch.KNOWN_MODELS["black-forest-labs/FLUX.1-dev"] == "flux1-dev"


@pytest.mark.parametrize("hub_id", sorted(HUB_IDS))
def test_hub_ids_resolve(hub_id):
    assert arch.KNOWN_MODELS[hub_id] == HUB_IDS[hub_id]
    assert arch.resolve(hub_id.lower() + "/") == HUB_IDS[hub_id]  # case and a trailing slash do not matter


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
    published = {"qwen-image": 20, "flux2-dev": 32, "flux2-klein-9b": 9, "flux2-klein-4b": 4, "z-image-turbo": 6}
    published.update({"wan22-ti2v-5b": 5, "wan22-t2v-a14b": 14, "flux1-kontext-dev": 12})
    assert {name: round(DENOISER_PARAMS[name] / 1e9) for name in published} == published
    assert round(DENOISER_PARAMS["hunyuan-video15-480p"] / 1e9, 1) == 8.3


@pytest.mark.parametrize("name", sorted(ENCODER_PARAMS))
def test_text_encoders_build_on_meta(name):
    assert {part: arch.parameter_count(name, part) for part in ENCODER_PARAMS[name]} == ENCODER_PARAMS[name]


def test_same_architecture_under_another_hub_id():
    # Kontext [dev] is FLUX.1-dev's architecture; Qwen-Image-Edit is Qwen-Image's (another pipeline and family).
    for a, b in (("flux1-kontext-dev", "flux1-dev"), ("qwen-image-edit", "qwen-image")):
        assert all(arch.config(a, part) == arch.config(b, part) for part in ("denoiser", "vae", "text_encoder"))
        assert arch.spec(a)["family"] != arch.spec(b)["family"]
    # Wan 2.2 A14B: two experts of one shape, switched at boundary_ratio.
    for name, boundary in (("wan22-t2v-a14b", 0.875), ("wan22-i2v-a14b", 0.9)):
        record = arch.spec(name)
        assert record["boundary_ratio"] == boundary and arch.config(name, "denoiser_2") == arch.config(name)
        assert arch.parameter_count(name, "denoiser_2") == DENOISER_PARAMS[name]


def test_depth_keeps_the_width_and_cuts_the_blocks():
    flux = arch.config("flux1-dev", depth=2)
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"]) == (2, 4, 24)
    sd3 = arch.config("sd35-medium", depth=3)
    assert sd3["num_layers"] == 3 and sd3["dual_attention_layers"] == [0, 1, 2]
    assert arch.num_blocks(arch.build("flux1-dev", depth=2)) == 6
    with pytest.raises(ConfigError, match="1 to 30"):
        arch.config("wan21-t2v-1.3b", depth=31)
    # FLUX.2 keeps its double:single ratio (dev 8:48, klein 9B 8:24, klein 4B 5:20).
    blocks = {name: arch.config(name, depth=2) for name in ("flux2-dev", "flux2-klein-9b", "flux2-klein-4b")}
    assert {name: (c["num_layers"], c["num_single_layers"]) for name, c in blocks.items()} == {
        "flux2-dev": (2, 12),
        "flux2-klein-9b": (2, 6),
        "flux2-klein-4b": (2, 8),
    }
    assert arch.config("z-image-turbo", depth=3)["n_layers"] == 3  # Z-Image names its block count n_layers
    assert arch.config("wan22-t2v-a14b", "denoiser_2", depth=2)["num_layers"] == 2
    with pytest.raises(ConfigError, match="1 to 60"):
        arch.config("qwen-image", depth=61)


@pytest.mark.parametrize(
    "name, blocks",
    [
        ("qwen-image", {"transformer_blocks": 2}),
        ("flux2-dev", {"transformer_blocks": 2, "single_transformer_blocks": 12}),
        ("z-image-turbo", {"layers": 2, "noise_refiner": 2, "context_refiner": 2}),  # refiners: the same block class
        ("hunyuan-video15-480p", {"transformer_blocks": 2}),
        ("wan22-ti2v-5b", {"blocks": 2}),
    ],
)
def test_block_lists_of_the_new_denoisers(name, blocks):
    model = arch.build(name, depth=2)
    found = {a: len(getattr(model, a)) for a in arch.BLOCK_ATTRIBUTES if hasattr(model, a)}
    assert found == blocks and arch.num_blocks(model) == sum(blocks.values())


def test_latent_shapes():
    assert inputs.latent_shape("flux1-dev", 512, 512) == (1, 16, 64, 64)
    assert inputs.latent_shape("flux2-dev", 512, 512) == (1, 32, 64, 64)  # 2x2-patched to 128 channels
    assert inputs.latent_shape("qwen-image", 512, 512) == (1, 16, 1, 64, 64)  # a video VAE on one frame
    assert inputs.latent_shape("wan22-t2v-a14b", 480, 832, 81) == (1, 16, 21, 60, 104)
    assert inputs.latent_shape("wan22-ti2v-5b", 704, 1280, 121) == (1, 48, 31, 44, 80)
    assert inputs.latent_shape("hunyuan-video15-480p", 480, 848, 121) == (1, 32, 31, 30, 53)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match="sd35-medium"):
        arch.spec("sd4")
    with pytest.raises(ConfigError, match="stabilityai/stable-diffusion-3.5-medium"):
        arch.resolve("someone/my-finetune")
    assert arch.resolve("someone/my-finetune", architecture="flux1-dev") == "flux1-dev"
    assert arch.resolve("stabilityai/stable-diffusion-3.5-medium") == "sd35-medium"
    with pytest.raises(ConfigError, match="flux1-dev"):  # the families without tiny text encoders say which have
        arch.build_pipeline("qwen-image")


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


def _cpu_inputs(name, **size):
    """inputs.denoiser_inputs on CPU with random values (ids and masks as the pipelines give them)."""
    values = inputs.denoiser_inputs(name, 1, **size, dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(0)

    def fill(t):
        if not isinstance(t, torch.Tensor):
            return [fill(x) for x in t] if isinstance(t, list) else t
        if not t.is_floating_point():
            return torch.ones_like(t)  # attention masks: every token valid
        return torch.zeros_like(t) if t.dim() == 2 and t.shape[-1] in (3, 4) else t.normal_(generator=generator)

    return {k: v if k == "img_shapes" else fill(v) for k, v in values.items()}


@pytest.mark.parametrize(
    "name, size",
    [
        ("wan22-ti2v-5b", dict(height=64, width=64, num_frames=5)),  # per-token timesteps, the 48-channel latent
        pytest.param("wan22-i2v-a14b", dict(height=32, width=32, num_frames=5), marks=pytest.mark.slow),
        pytest.param("qwen-image-edit", dict(height=64, width=64), marks=pytest.mark.slow),
        pytest.param("flux1-kontext-dev", dict(height=64, width=64), marks=pytest.mark.slow),
        pytest.param("flux2-klein-4b", dict(height=64, width=64), marks=pytest.mark.slow),
        pytest.param("z-image-turbo", dict(height=64, width=64), marks=pytest.mark.slow),
        pytest.param("hunyuan-video15-480p", dict(height=32, width=32, num_frames=5), marks=pytest.mark.slow),
    ],
)
def test_planned_inputs_run_the_real_forward_on_cpu(name, size):
    """The inputs plan measures with (visalign.architectures.inputs) are what the real forward takes: one
    block of the real width on CPU returns one velocity per latent value (editing: per noisy and source token)."""
    model = arch.build(name, device="cpu", depth=1)
    with torch.no_grad():
        out = inputs.denoise(model, _cpu_inputs(name, **size, text_tokens=8))
    copies = 2 if arch.spec(name)["family"] in ("flux-kontext", "qwen-image-edit") else 1
    latent = inputs.latent_shape(name, size["height"], size["width"], size.get("num_frames"))
    assert out.shape[0] == 1 and out.numel() == copies * torch.Size(latent).numel() and torch.isfinite(out).all()


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
