"""Benchmarks: the localisation benchmark on digit canvases and real data sets (``backplay bench
localisation``), its small models, data set loaders and ``torchrun`` sharding.

Modules: :mod:`~backplay.bench.digits` (canvases from scikit-learn's ``load_digits``),
:mod:`~backplay.bench.models` (small CNN / ViT, training, cache, checkpoints),
:mod:`~backplay.bench.localisation` (protocol, table, plots), :mod:`~backplay.bench.datasets`
(ImageNet-S, PASCAL VOC), :mod:`~backplay.bench.distributed` (sharding),
:mod:`~backplay.bench.rulespec` (rules from text); figures come from :mod:`backplay.plot`.
Imported on demand (``import backplay.bench``); ``import backplay`` does not load it.
"""
