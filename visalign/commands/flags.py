"""The sampling flags of ``visalign sample`` and ``visalign steer``, generated from the metadata of
:class:`~visalign.sampling.SamplingOptions` (names, types, choices, help and defaults written once, there).
"""

from __future__ import annotations

import argparse


def cli_sampling_fields() -> list:
    """The :class:`~visalign.sampling.SamplingOptions` fields that are command-line flags (metadata ``cli``
    not False).
    """
    import dataclasses

    from visalign.sampling import SamplingOptions

    return [f for f in dataclasses.fields(SamplingOptions) if f.metadata.get("cli", True) is not False]


def flag_type(name: str, annotation) -> tuple[type, list | None]:
    """``(type, choices)`` of a flag from its field's annotation: int, float, str, bool, a Literal, or X | None."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return flag_type(name, kinds[0])
    if annotation in (int, float, str, bool):
        return annotation, None
    raise TypeError(
        f"SamplingOptions.{name} has type {annotation}, which has no command-line flag; give it "
        "metadata={'cli': False}, or teach visalign.cli.flag_type the type."
    )


def add_sampling_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """One flag per :class:`~visalign.sampling.SamplingOptions` field the CLI exposes, generated from its metadata.

    The flags are the field's ``metadata["flags"]``, else ``--`` + its name with dashes; the type and choices come
    from its annotation; the help is the field's help sentence with the default. The parsed value lands in
    ``args.<field name>``. ``defaults`` overrides a field's default for this command (``sampler="ode"``).
    """
    import typing

    from visalign.sampling import SamplingOptions

    fields = cli_sampling_fields()
    unknown = set(defaults) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"no sampling flag for {sorted(unknown)}")
    hints, base = typing.get_type_hints(SamplingOptions), SamplingOptions()
    for field in fields:
        default = defaults.get(field.name, getattr(base, field.name))
        kind, choices = flag_type(field.name, hints[field.name])
        flags = field.metadata.get("flags") or ("--" + field.name.replace("_", "-"),)
        text = f"{field.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(
                *flags, dest=field.name, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        else:
            metavar = None if choices else flags[0].lstrip("-").replace("-", "_").upper()
            parser.add_argument(
                *flags, dest=field.name, type=kind, choices=choices, default=default, help=text, metavar=metavar
            )


def add_attention_backend_option(parser: argparse.ArgumentParser) -> None:
    """``--attention-backend NAME``, shared by ``sample`` and ``steer`` (``args.attention_backend``).

    The names are :data:`visalign.pipelines.attention.ATTENTION_BACKENDS`, the ones the trainers'
    ``attention_backend`` and ``va.load`` take; :func:`~visalign.commands.common.load_policy_for_cli`
    applies the choice with the function the trainer uses.
    """
    from visalign.pipelines.attention import ATTENTION_BACKENDS

    parser.add_argument(
        "--attention-backend",
        metavar="NAME",
        choices=list(ATTENTION_BACKENDS),
        default="native",
        help="attention kernel of the denoiser: native (PyTorch's scaled_dot_product_attention; sdpa is the "
        "same), xformers, flash (flash-attn 2) or sage (SageAttention); the last three need their package "
        "(extras: xformers, flash, sage) (default: native)",
    )


def sampling_kwargs_from_args(args, generator) -> dict:
    """The sampling keywords of ``va.sample`` and the steering functions, from the parsed flags."""
    return {
        **{f.name: getattr(args, f.name) for f in cli_sampling_fields()},
        "generator": generator,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
    }
