"""Measurements, outside the library: they print tables and write JSON, and nothing in the
pipeline depends on them. ``python -m stages.benchmark <what>`` runs them.

  models.py     step time of CFG against AGD on full-size architectures; adapter parameter counts
  data_path.py  the training loader, recording overhead, bytes on disk per format, lossy storage
"""
