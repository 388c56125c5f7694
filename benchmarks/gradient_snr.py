"""How much signal is in one iteration's gradient? Each toy recipe, measured at the base model.

For each trainer this takes ``--batches`` independent iterations' gradients at the same weights
(the optimizer step is replaced by a capture, so the weights never move) and prints:

- ``pair_cos``: the mean cosine between two batches' gradients. Two independent noisy estimates
  g + n1 and g + n2 have an expected cosine of about |g|² / (|g|² + E|n|²), so this is the
  gradient's signal-to-noise ratio per iteration (0: pure noise, 1: no noise).
- ``cos_draft``: the cosine between the mean of those gradients and the mean DRaFT gradient, i.e.
  whether the trainer pushes the weights the way the reward's own gradient does.
- seconds per iteration, and the samples each iteration generates.

The score-function trainers (GRPO, PRDP) learn from which noise the sampler drew, so their
per-sample signal shrinks with the latent's dimension (4×16×16 here); DRaFT backpropagates the
reward's gradient directly. This explains the different iteration counts the toy recipes need
(BENCHMARKS.md, "Toy world: gradient signal per iteration").

    python benchmarks/gradient_snr.py                     # all four recipes, 6 batches each
    python benchmarks/gradient_snr.py --only grpo dpo --batches 8
"""

from __future__ import annotations

import argparse
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ("draft", "grpo", "dpo", "prdp")


def batch_gradients(algorithm: str, batches: int) -> tuple[torch.Tensor, float, int]:
    """Gradients of ``batches`` iterations of ``configs/toy_<algorithm>.yaml`` at the base weights.

    Returns:
        ``(gradients (batches, P), seconds per iteration, samples per iteration)``.
    """
    from visalign.recipes import load_recipe

    overrides = ["output_dir=runs/gradient_snr", "trackers=[]", "sample_every=0", "checkpoint_every=0", "seed=0"]
    if algorithm in ("dpo", "prdp"):
        overrides.append("updates_per_rollout=1")  # one gradient per iteration, at the base weights
    cls, policy, reward, prompts, config = load_recipe(
        os.path.join(ROOT, "configs", f"toy_{algorithm}.yaml"), overrides
    )
    trainer = cls(policy, reward, prompts, config)
    captured: list[torch.Tensor] = []

    def capture() -> dict:
        grads = [
            p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in trainer.trainable_parameters
        ]
        captured.append(torch.cat(grads).float().clone())
        trainer.optimizer.zero_grad(set_to_none=True)
        return {}

    trainer.optimizer_step = capture
    start = time.perf_counter()
    for step in range(batches):
        trainer._seed_step(step)
        trainer.train_step(step)
    seconds = (time.perf_counter() - start) / batches
    return torch.stack(captured), seconds, samples_per_iteration(config)


def samples_per_iteration(config) -> int:
    """Images each iteration generates: DRaFT one per prompt, the others a group per prompt."""
    return config.prompts_per_step * getattr(config, "group_size", 1)


def mean_pair_cosine(gradients: torch.Tensor) -> float:
    """Mean cosine over all pairs of distinct rows."""
    unit = torch.nn.functional.normalize(gradients, dim=1)
    n = unit.shape[0]
    return float(((unit @ unit.T).sum() - n) / (n * (n - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--batches", type=int, default=6, help="iterations measured per trainer (default 6)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {"draft": batch_gradients("draft", args.batches)}
    draft_direction = results["draft"][0].mean(0)
    print(f"{'recipe':8s} {'samples/it':>10s} {'s/it':>6s} {'pair_cos':>9s} {'cos_draft':>10s}")
    for algorithm in args.only:
        if algorithm not in results:
            results[algorithm] = batch_gradients(algorithm, args.batches)
        grads, seconds, samples = results[algorithm]
        cos = float(torch.nn.functional.cosine_similarity(grads.mean(0), draft_direction, dim=0))
        print(f"{algorithm:8s} {samples:>10d} {seconds:>6.1f} {mean_pair_cosine(grads):>9.3f} {cos:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
