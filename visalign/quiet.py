"""Library notices a visalign user cannot act on, silenced at the narrowest scope (one logger, one message).

The CLI and the demo call :func:`quiet_library_notices` once; library code never changes a library's
global verbosity.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_library_notices"]

_TORCHVISION_NOTICE = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallbackNotice:
    """Drops transformers' "…ImageProcessor requires torchvision; falling back to …Pil" notice.

    The default environment must not contain torchvision (its registry build breaks CPU torch), so
    a user cannot act on it; the PIL processors it falls back to are the ones visalign wants.
    """

    def filter(self, record) -> bool:
        return _TORCHVISION_NOTICE not in record.getMessage()


def quiet_library_notices() -> None:
    """Installs the filter above on the one transformers logger that emits the notice (idempotent)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallbackNotice())
