"""Exceptions that visalign raises for bad input.

Every message says what was given, what was expected and how to fix it. Each class also
derives from the builtin exception a Python user would expect (``ValueError`` for a bad value,
``ImportError`` for a missing package, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class VisalignError(Exception):
    """Base class of every error that visalign raises on purpose."""


class ConfigError(VisalignError, ValueError):
    """A configuration value or option is invalid (unknown key, out-of-range number, ...)."""


class UnknownFamilyError(ConfigError):
    """A model family name that visalign does not know."""


class UnsupportedPipelineError(VisalignError, TypeError):
    """A diffusers pipeline class that no visalign adapter handles."""


class InvalidInputError(VisalignError, ValueError):
    """A tensor, prompt list or image given to visalign has the wrong shape, range or size."""


class SamplerError(ConfigError):
    """A sampler was asked for something it cannot do (e.g. log-probs of the ODE sampler)."""


class MissingDependencyError(VisalignError, ImportError):
    """An optional package is needed; the message names the extra to install."""


class NotDifferentiableError(VisalignError, RuntimeError):
    """A gradient was requested through something that is not differentiable."""


class RewardError(VisalignError, RuntimeError):
    """A reward returned something unusable (wrong shape, NaN, ...)."""


class CheckpointError(VisalignError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


class InsufficientMemoryError(ConfigError, MemoryError):
    """A run's settings need more host or GPU memory than the machine has (checked before training)."""


def require(package: str, extra: str, purpose: str):
    """Imports ``package`` or raises :class:`MissingDependencyError` naming the extra to install.

    Args:
        package: the importable module name, e.g. ``"open_clip"``.
        extra: the visalign extra that provides it, e.g. ``"openclip"``.
        purpose: what needs it, e.g. ``"HPSv2"``, for the message.
    """
    import importlib

    try:
        return importlib.import_module(package)
    except Exception as exc:  # ImportError, or a broken install raising something else
        raise MissingDependencyError(
            f"{purpose} needs the optional package '{package}', which could not be imported "
            f'({type(exc).__name__}: {exc}). Install it with `pip install "visalign[{extra}]"`.'
        ) from exc


class RewardUnavailableError(RewardError):
    """A reward served by another process (:class:`~visalign.rewards.RemoteReward`) could not be reached
    or did not answer in time. Trainers skip the step, as for any :class:`RewardError`.
    """
