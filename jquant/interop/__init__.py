"""Checkpoint formats of other tools: pre-quantized GPTQ, AWQ and compressed-tensors
Hugging Face checkpoints (read into QTensors and written from them), and GGUF export.

- :mod:`jquant.interop.base`: the integer weight every one of these formats stores.
- :mod:`jquant.interop.gptq`, :mod:`~jquant.interop.awq`,
  :mod:`~jquant.interop.compressed_tensors`: one linear's tensors and the format's config.
- :mod:`jquant.interop.hf`: whole checkpoints (``save_quantized``; reading goes through
  ``jquant.models.load``, which sees ``quantization_config`` in ``config.json``).
"""

from jquant.interop.hf import EXPORT_FORMATS, reader, save_quantized

__all__ = ["EXPORT_FORMATS", "reader", "save_quantized"]
