"""saliency-study: reproductions of five papers on saliency maps."""

from study._torchvision_compat import import_torchvision as _import_torchvision

_import_torchvision()

__version__ = "0.1.0"
