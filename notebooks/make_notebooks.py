"""Writes the example notebooks from the cell sources below and executes them in place.

    python notebooks/make_notebooks.py            # all notebooks
    python notebooks/make_notebooks.py rewards    # one

The notebooks are committed with their outputs so they read well on GitHub; the test suite
re-executes them (tests/test_notebooks.py). Keeping the sources here keeps diffs readable.
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """\
import os, warnings
os.environ["TRANSFORMERS_VERBOSITY"] = "error"   # no torchvision here: silence the processor fallback notes
warnings.filterwarnings("ignore")
import transformers, diffusers
transformers.utils.logging.disable_progress_bar(); diffusers.utils.logging.disable_progress_bar()
import torch
torch.set_num_threads(1)      # tiny models: one thread is fastest
torch.manual_seed(0)
import visalign as va
from visalign.media import image_grid
"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS["quickstart"] = [
    (
        "md",
        """\
# visalign quickstart

Wrap a diffusers pipeline, sample with exact log-probabilities, score the images, and run a few
GRPO steps, all offline on the embedded toy world: a small SD3-style text-to-image model trained
on captioned shapes ("a red circle on the left"), a toy CLIP reward, and an exact evaluator that
reads colour, shape and position back from the pixels.""",
    ),
    (
        "code",
        SETUP
        + """\
from visalign import toy
from visalign.recipes import toy_model_path

# Any diffusers folder or hub id loads the same way. The toy model was trained to work with a
# 1-token T5 slot (its T5 is a zero stand-in), which makes it several times faster on a CPU.
policy = va.load(toy_model_path("t2i"), local_files_only=True, policy_kwargs={"max_sequence_length": 1})
policy""",
    ),
    (
        "md",
        """\
## Sample
`va.sample` runs visalign's own loop through the pipeline's components. With `sampler="ode"` it
reproduces the stock pipeline; with `sampler="sde"` every step is a Gaussian whose exact
log-probability is stored, which is what GRPO trains on.""",
    ),
    (
        "code",
        """\
prompts = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a yellow square in the center"]
traj = va.sample(policy, prompts, num_steps=10, guidance_scale=3.0, sampler="sde", eta=0.7,
                 generator=torch.Generator().manual_seed(0), height=32, width=32, return_x0=True)
print("images", tuple(traj.images.shape), "| states", tuple(traj.latents.shape), "| log-probs", tuple(traj.log_probs.shape))
print("sigmas", [round(s, 3) for s in traj.sigmas.tolist()])
image_grid(traj.images, nrow=4).resize((4 * 34 * 4, 34 * 4), 0)""",
    ),
    (
        "md",
        """\
Recomputing the log-probs under the current weights gives ratio 1: the invariant every policy
gradient method relies on.""",
    ),
    (
        "code",
        """\
with torch.no_grad():
    again = va.log_prob(policy, traj, steps=[0, 3, 6])
print("max |ratio − 1| =", float((again.log_probs - traj.log_probs[:, [0, 3, 6]]).exp().sub(1).abs().max()))""",
    ),
    (
        "md",
        """\
## Score
The toy CLIP loads with the ordinary `CLIPScore` reward. The exact evaluator says which
attributes each image gets right.""",
    ),
    (
        "code",
        """\
reward = va.rewards.CLIPScore(model=toy_model_path("clip"), variant="cosine")
print("toy-CLIP reward:", reward(traj.images, prompts))
result = toy.evaluate(traj.images, prompts)
print("evaluator: all correct", result["all_correct"], "| per attribute", result["accuracy"])""",
    ),
    (
        "md",
        """\
## A few GRPO steps
Eight samples per prompt, group-relative advantages, PPO-clipped policy gradient on a LoRA. A real
run is longer (`make demo` runs one and writes a report); here we only check the machinery.""",
    ),
    (
        "code",
        """\
import tempfile
config = va.GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=4, num_steps=10, guidance_scale=3.0,
                       group_size=8, prompts_per_step=2, height=32, width=32, learning_rate=3e-4,
                       lora_rank=16, clip_range=1e-3, trackers=["jsonl"])
trainer = va.GRPOTrainer(policy, reward, toy.all_captions(), config)
metrics = trainer.train()
print({k: round(v, 4) for k, v in metrics.items() if k in ("reward_mean", "reward_std", "clipfrac", "approx_kl", "grad_norm")})""",
    ),
    (
        "code",
        """\
after = va.sample(trainer.policy, prompts, num_steps=10, guidance_scale=3.0, sampler="ode",
                  generator=torch.Generator().manual_seed(0), height=32, width=32)
trainer.save_lora(os.path.join(config.output_dir, "lora"))   # pipe.load_lora_weights(...) reads it
image_grid(after.images, nrow=4).resize((4 * 34 * 4, 34 * 4), 0)""",
    ),
]

NOTEBOOKS["rewards"] = [
    (
        "md",
        """\
# A tour of visalign's rewards

Every reward is called the same way, `reward(images, prompts) -> Tensor[B]`, on float images in
[0, 1] shaped `(B, 3, H, W)` (videos: `(B, T, 3, H, W)`). Here they run on tiny offline models and
on the embedded toy world, so nothing is downloaded; with real checkpoints the same calls load
`openai/clip-vit-large-patch14`, `yuvalkirstain/PickScore_v1`, a VLM, and so on.""",
    ),
    (
        "code",
        SETUP
        + """\
from visalign import rewards, toy
from visalign.recipes import toy_model_path
from visalign.testing import tiny_aesthetic, tiny_vlm

captions = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
            "a yellow circle at the bottom"]
images = toy.render_batch(captions)           # exact renders of the captions, (4, 3, 32, 32)
image_grid(images, nrow=4).resize((4 * 34 * 3, 34 * 3), 0)""",
    ),
    (
        "md",
        """\
## CLIP score
`CLIPScore` has three documented variants: Hessel et al.'s `2.5·max(cos, 0)` with the prefix
"A photo depicts " (`variant="hessel"`, the default), the raw cosine (`"cosine"`) and torchmetrics'
`100·max(cos, 0)` (`"torchmetrics"`). The toy CLIP shipped with visalign (a transformers
`CLIPModel` trained contrastively on the toy world's captions) loads like any CLIP checkpoint and
ranks the true caption of each image first.""",
    ),
    (
        "code",
        """\
clip = rewards.CLIPScore(model=toy_model_path("clip"), variant="cosine")
scores = torch.stack([clip(images, [c] * 4) for c in captions])   # row: caption, column: image
print("cosine(caption i, image j):")
for c, row in zip(captions, scores):
    print(f"  {c:32s}", " ".join(f"{v:+.3f}" for v in row.tolist()))
print("true caption ranked first for", int((scores.argmax(0) == torch.arange(4)).sum()), "of 4 images")""",
    ),
    (
        "md",
        """\
## Gradients reach the pixels
CLIP-based rewards are differentiable: preprocessing (bicubic antialiased resize, centre crop,
normalisation) is torch code. This is what DRaFT and reward guidance use.""",
    ),
    (
        "code",
        """\
pixels = images.clone().requires_grad_(True)
clip(pixels, captions).sum().backward()
print("gradient norm per image:", pixels.grad.flatten(1).norm(dim=1))""",
    ),
    (
        "md",
        """\
## Aesthetic predictor, VLM yes-token, and combining rewards
`Aesthetic` is the LAION MLP on normalised CLIP ViT-L/14 embeddings (here: a tiny random one).
`YesTokenReward` asks a vision-language model whether the image shows the prompt and reads
P("yes") from the next-token distribution (RewardDance / VQAScore). `Combined` is a weighted
sum that keeps every component for logging and per-reward advantages.""",
    ),
    (
        "code",
        """\
mlp, aesthetic_clip, aesthetic_processor = tiny_aesthetic(seed=0)
aesthetic = rewards.Aesthetic(predictor=mlp, clip_model=aesthetic_clip, processor=aesthetic_processor)
vlm_model, vlm_processor = tiny_vlm(seed=0)
yes = rewards.YesTokenReward(vlm_model, vlm_processor)
combined = rewards.Combined({"clip": (clip, 1.0), "aesthetic": (aesthetic, 0.5), "vqa": (yes, 0.25)})
out = combined.evaluate(images, captions)
print("total     ", out.total)
for name, value in out.components.items():
    print(f"{name:10s}", value)""",
    ),
    (
        "md",
        """\
## The exact toy evaluator as a reward
The toy world's evaluator reads colour, shape and position back from pixels, so it is an exact
(non-differentiable) reward: the fraction of the caption's attributes the image gets right.""",
    ),
    (
        "code",
        """\
exact = toy.ToyEvaluatorReward()
wrong = toy.render_batch(["a red square on the left", "a blue square on the left",
                          "a green triangle at the top", "a purple circle at the bottom"])
print("true renders :", exact(images, captions))
print("edited renders:", exact(wrong, captions))""",
    ),
]

NOTEBOOKS["steering"] = [
    (
        "md",
        """\
# Inference-time steering

Improve samples without training: best-of-N, Feynman-Kac particle steering, and reward-gradient
guidance, on the toy text-to-image model with the exact toy evaluator and the toy CLIP as rewards.""",
    ),
    (
        "code",
        SETUP
        + """\
from visalign import toy
from visalign.recipes import toy_model_path

policy = va.load(toy_model_path("t2i"), local_files_only=True, policy_kwargs={"max_sequence_length": 1})
clip = va.rewards.CLIPScore(model=toy_model_path("clip"), variant="cosine")
prompts = ["a red circle on the left", "a purple triangle at the bottom"]
common = dict(num_steps=10, guidance_scale=3.0, height=32, width=32)""",
    ),
    (
        "md",
        """\
## Best-of-N
N independent samples per prompt; keep the highest reward. The baseline at matched compute.""",
    ),
    (
        "code",
        """\
bon = va.best_of_n(policy, prompts, clip, n=4, generator=torch.Generator().manual_seed(0), **common)
print("best rewards:", bon.rewards)
image_grid(bon.images, nrow=2).resize((2 * 34 * 4, 34 * 4), 0)""",
    ),
    (
        "md",
        """\
## Feynman-Kac steering
N particles per prompt run a stochastic sampler; every few steps each particle's x̂0 is decoded
and scored, and particles are resampled by their potential, so compute flows to promising
trajectories. The final correction makes the target exactly `p(x)·exp(λ·r(x0))`.""",
    ),
    (
        "code",
        """\
fk = va.fk_steer(policy, prompts, clip, num_particles=4, potential="max", lam=10.0, resample_every=3,
                 generator=torch.Generator().manual_seed(0), **common)
print("best rewards:", fk.rewards)
print("ESS after each step (prompt 0):", [round(float(e), 2) for e in fk.ess[0]])
print("resampled at steps:", torch.nonzero(fk.resampled[0]).flatten().tolist(), "| model evaluations:", fk.num_model_evals)
image_grid(fk.images, nrow=2).resize((2 * 34 * 4, 34 * 4), 0)""",
    ),
    (
        "md",
        """\
## Reward-gradient guidance
A differentiable reward's gradient on the decoded x̂0 is added to the sampler's drift (DPS-style;
VideoAlign's Flow-NRG idea), over a chosen range of steps.""",
    ),
    (
        "code",
        """\
plain = va.sample(policy, prompts, sampler="sde", generator=torch.Generator().manual_seed(0), **common)
guided = va.reward_guidance(policy, prompts, clip, scale=2.0, generator=torch.Generator().manual_seed(0), **common)
print("reward without guidance:", clip(plain.images, prompts))
print("reward with guidance:   ", guided.rewards)
print("exact evaluator score, guided:", toy.ToyEvaluatorReward()(guided.images, prompts))""",
    ),
]

NOTEBOOKS["video"] = [
    (
        "md",
        """\
# Video: text-to-video and image-to-video

Wan 2.1 pipelines go through the same `Policy` as images. Here they are tiny random models from
`visalign.testing` (32×32, 5 frames), and the rewards are the toy world's. With the real
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` weights the code is the same, only the sizes change.""",
    ),
    (
        "code",
        SETUP
        + """\
from visalign import rewards, toy
from visalign.testing import tiny_pipeline

t2v = va.wrap(tiny_pipeline("wan-t2v"))
traj = va.sample(t2v, ["a red circle moving right", "a blue square moving up"], num_steps=6,
                 sampler="sde", generator=torch.Generator().manual_seed(0), height=32, width=32, num_frames=5)
print("videos:", tuple(traj.images.shape), " log-probs:", tuple(traj.log_probs.shape))
image_grid(traj.images[0], nrow=5).resize((5 * 34 * 3, 34 * 3), 0)   # the frames of the first video""",
    ),
    (
        "md",
        """\
## A segmental video reward
InstructVideo's recipe: split the frames into segments, score one frame per segment with an image
reward, weight frames by a temporal attenuation `exp(−λ·|f − F/2|)`, and average. Here the image
reward is brightness, so the numbers are easy to check by hand.""",
    ),
    (
        "code",
        """\
brightness = lambda images, prompts: images.flatten(1).mean(1)
video_reward = rewards.SegmentalVideoReward(brightness, segments=3, sampling="fixed", attenuation=0.5)
print("scores:", video_reward(traj.images, traj.prompts))
print("frames used:", video_reward.last_frame_indices, " weights:", video_reward.last_weights)""",
    ),
    (
        "md",
        """\
## Image-to-video
The I2V policy takes one first frame per prompt; here a toy-world render. Different first frames
give different videos from the same noise.""",
    ),
    (
        "code",
        """\
i2v = va.wrap(tiny_pipeline("wan-i2v"))
frames = toy.render_batch(["a red circle", "a green triangle"])
video = va.sample(i2v, ["a red circle moving right", "a green triangle moving up"], images=frames, num_steps=6,
                  sampler="ode", generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)],
                  height=32, width=32, num_frames=5)
image_grid(torch.cat([frames[:1], video.images[0]]), nrow=6).resize((6 * 34 * 3, 34 * 3), 0)""",
    ),
    (
        "md",
        """\
## A few GRPO steps on video
The same trainer as for images. Tiny random models learn brightness fastest with full fine-tuning.""",
    ),
    (
        "code",
        """\
import tempfile
config = va.GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=3, num_steps=6, group_size=4, prompts_per_step=2,
                       height=32, width=32, num_frames=5, use_lora=False, learning_rate=1e-2, guidance_scale=1.0,
                       trackers=["jsonl"])
trainer = va.GRPOTrainer(t2v, video_reward, ["a red circle moving right", "a blue square moving up"], config)
metrics = trainer.train()
print({k: round(v, 4) for k, v in metrics.items() if k.startswith(("reward", "time"))})
from visalign.media import save_video
path = save_video(traj.images[0], os.path.join(tempfile.mkdtemp(), "example.gif"))
print("saved", os.path.basename(path))""",
    ),
]


def build(name: str, execute: bool = True) -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        for kind, src in NOTEBOOKS[name]
    ]
    path = os.path.join(HERE, f"{name}.ipynb")
    if execute:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or NOTEBOOKS:
        print("wrote", build(name))
