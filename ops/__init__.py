from ops import (
    mhc,  # noqa: F401,E402
    newton_schulz,  # noqa: F401,E402
)

try:  # Triton kernels: registered lazily (no kernel defined, triton not imported, until first use)
    from ops import triton as _triton_ops  # noqa: F401,E402
except ImportError:
    pass
from ops import (  # noqa: E402
    blocked_attention,  # noqa: F401
    blocked_indexer,  # noqa: F401
    blocked_indexer_select,  # noqa: F401
    compressor,  # noqa: F401
    indexer,  # noqa: F401
    indexer_kl,  # noqa: F401
    linear_cross_entropy,  # noqa: F401
    rms_norm,  # noqa: F401
    rope,  # noqa: F401
    sparse_attention,  # noqa: F401
)
