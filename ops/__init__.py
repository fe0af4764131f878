from ops import mhc  # noqa: F401,E402
from ops import newton_schulz  # noqa: F401,E402
from ops import compressor, indexer, rope, sparse_attention  # noqa: F401,E402
