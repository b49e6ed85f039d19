"""Plain-PyTorch ground truth: functional ops (``functional``) and the published layers (every other module of
this package; each module's ``__all__`` is exported here, so a new layer file needs no line in this file)."""
from .._util import export_modules
from . import functional

__all__ = ["functional", *export_modules(__name__, __path__, globals(), skip=("functional",))]
