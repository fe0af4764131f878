from ops import (
    mhc,  # noqa: F401,E402
    newton_schulz,  # noqa: F401,E402
)

try:  # Triton kernels: registered lazily (no kernel defined, triton not imported, until first use)
    from ops import triton as _triton_ops  # noqa: F401,E402
except ImportError:
    pass
from ops import blocked_attention, compressor, indexer, rope, sparse_attention  # noqa: F401,E402
