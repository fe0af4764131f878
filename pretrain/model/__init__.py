"""DeepSeek-V4 model on megatron-core: mHC streams, hybrid attention (CSA/HCA/sliding), MoE, MTP.

Modules: ``mhc`` (hyper-connections), ``attention`` (+ compressor, indexer, rope, rmsnorm), ``moe``, ``mtp``,
``transformer`` (blocks + :class:`DeepSeekV4Model`), ``hf`` (HF conversion), ``param_count``.
Import the classes from their modules (importing this package does not import megatron).
"""
