"""PyTorch builders of training-time re-parameterizable families, their deploy (plain)
reference structures, and ONNX export in the four forms real pipelines produce.

See :mod:`models.registry` (``FAMILIES``) and :mod:`models.export` (``export``,
``export_forms``, CLI ``python -m models.export``).
"""
