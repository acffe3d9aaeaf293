"""distilsd: make Stable Diffusion small and fast.

The package is organised by stage, and each stage is importable on its own:

- :mod:`distilsd.generate`: load any SD 1.x/2.x pipeline and generate images;
- :mod:`distilsd.compress`: build BK-SDM-style student U-Nets from a teacher.

Heavy libraries (torch, diffusers) are imported by the stage modules, not here, so that
``import distilsd`` and ``distilsd --help`` stay fast.
"""

from distilsd.logging_utils import configure_library_root_logger

__version__ = "0.1.0"

__all__ = ["__version__"]

# Every module logs to a `distilsd.*` logger; give their common parent its handler once, here.
configure_library_root_logger()
