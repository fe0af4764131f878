"""Import mosaicml-streaming's core without its package ``__init__``.

``streaming/__init__.py`` imports ``streaming.vision`` which imports torchvision; torchvision cannot be
imported beside the CPU torch build (``operator torchvision::nms does not exist``) and installing it
pulls a CUDA torch. Everything we use lives in ``streaming.base``, so we register ``streaming`` as a bare
namespace package pointing at the installed directory and import ``streaming.base`` from it.
(docs/STACK.md §9; the same holds for the ``streaming-community`` fork.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def import_streaming() -> types.ModuleType:
    """Return ``streaming.base`` (MDSWriter, Stream, StreamingDataset, ...) without importing torchvision."""
    if "streaming.base" in sys.modules:
        return sys.modules["streaming.base"]
    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "mosaicml-streaming is not installed; run `make setup` "
                "(it installs it with --no-deps from requirements-nodeps.txt)"
            )
        pkg = types.ModuleType("streaming")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        sys.modules["streaming"] = pkg
    return importlib.import_module("streaming.base")
