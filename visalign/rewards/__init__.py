"""Rewards: score decoded images or videos against their prompts.

Every reward is called the same way::

    scores = reward(images, prompts)   # images: float [0, 1], (B, 3, H, W) or (B, T, 3, H, W)
                                       # scores: float32 (B,) on the images' device

and any plain callable with that signature is a reward too. Inside visalign, trainers, steering
and the CLI call both through :func:`call_reward`, which checks the output and returns a
:class:`RewardResult`: the total with the reward's named parts (``reward.evaluate(images, prompts)``
returns the same for a :class:`Reward`).

=========================  ==================================================  ==================
reward                     what it scores                                      differentiable
=========================  ==================================================  ==================
:class:`CLIPScore`         CLIP image-text cosine (Hessel et al. 2104.08718)   yes
:class:`PickScore`         preference CLIP-H (Kirstain et al. 2305.01569)      yes
:class:`Aesthetic`         LAION aesthetic MLP on CLIP ViT-L/14                yes
:class:`HPSv2`             HPS v2/v2.1 open_clip (Wu et al. 2306.09341)        yes (openclip extra)
:class:`ImageReward`       BLIP + MLP preference (Xu et al. 2304.05977)        yes
:class:`HPSv3`             Qwen2-VL reward-token head (Ma et al. 2508.03789)   yes
:class:`VideoAlignReward`  Qwen2-VL VQ+MQ+TA heads (Liu et al. 2501.13918)     yes
:class:`YesTokenReward`    VLM P("yes") (RewardDance 2509.08826, VQAScore)     optional
:class:`SegmentalVideoReward`  image reward on sampled frames (InstructVideo)  as its image reward
:class:`MultiHeadVideoReward`  multi-head video models (VideoAlign 2501.13918)  optional
:class:`OCRReward`         quoted prompt text read back by OCR (Flow-GRPO)     no (ocr extra)
:class:`GenEvalReward`     GenEval rules on detections (OWLv2, G-DINO, toy)    no
:class:`UnifiedReward`     VLM judge verdict, local or chat endpoint           no
:class:`RemoteReward`      a reward served by ``visalign serve-reward``        no
:class:`Combined`          weighted sum, optional running normalisation        when all parts are
=========================  ==================================================  ==================

Importing this package does not import transformers or open_clip; each reward imports what it
needs when it is built.
"""

from visalign.rewards.aesthetic import AESTHETIC_URL, Aesthetic, AestheticMLP
from visalign.rewards.base import FunctionReward, Reward, as_reward, call_reward, is_differentiable, reward_name
from visalign.rewards.checks import check_images, check_prompts, check_scores
from visalign.rewards.clip import CLIPEmbedder, CLIPScore, PickScore
from visalign.rewards.combine import Combined, RunningNorm
from visalign.rewards.edit import EditReward
from visalign.rewards.geneval import GenEvalReward
from visalign.rewards.hps import HPSv2
from visalign.rewards.hpsv3 import HPSv3
from visalign.rewards.image_reward import ImageReward
from visalign.rewards.ocr import OCRReward
from visalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform
from visalign.rewards.remote import RemoteReward
from visalign.rewards.result import RewardResult
from visalign.rewards.unified import UnifiedReward
from visalign.rewards.video import (
    MultiHeadVideoReward,
    SegmentalVideoReward,
    VideoReward,
    attenuation_weights,
    segment_indices,
)
from visalign.rewards.video_align import VideoAlignReward
from visalign.rewards.vlm import YesTokenReward, answer_token_ids

__all__ = [
    "Reward",
    "RewardResult",
    "FunctionReward",
    "as_reward",
    "call_reward",
    "reward_name",
    "is_differentiable",
    "check_images",
    "check_prompts",
    "check_scores",
    "ImageTransform",
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPScore",
    "PickScore",
    "CLIPEmbedder",
    "Aesthetic",
    "AestheticMLP",
    "AESTHETIC_URL",
    "HPSv2",
    "ImageReward",
    "HPSv3",
    "VideoAlignReward",
    "YesTokenReward",
    "answer_token_ids",
    "EditReward",
    "VideoReward",
    "SegmentalVideoReward",
    "MultiHeadVideoReward",
    "segment_indices",
    "attenuation_weights",
    "Combined",
    "RunningNorm",
    "OCRReward",
    "RemoteReward",
    "GenEvalReward",
    "UnifiedReward",
]
