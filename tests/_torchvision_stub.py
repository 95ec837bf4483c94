"""The tests' import of zennit under a scoped stand-in for ``torchvision.models.resnet``: the helpers
live in :mod:`backplay.testing.peers` (``backplay verify`` needs them too); this module keeps the
tests' import path (``from _torchvision_stub import import_zennit, torchvision_stub``). Not a
conftest: only the peer tests import it.
"""

from backplay.testing.peers import import_zennit, torchvision_stub

__all__ = ["torchvision_stub", "import_zennit"]
