"""Low-precision weights: blockwise FP8 (``fp8``), engine-side FP8 loading (``fp8_engine``),
FP8 training flags (``fp8_training``) and modelopt QAT (``qat``)."""
