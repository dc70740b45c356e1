"""Saliency metrics: perturbation (faithfulness), localisation, complexity, reliability, randomisation.

Every public name of the five submodules is re-exported here, e.g. ``study.metrics.energy_pointing_game``.
"""

from study.metrics import complexity, localisation, perturbation, randomisation, reliability
from study.metrics.complexity import *  # noqa: F401,F403
from study.metrics.localisation import *  # noqa: F401,F403
from study.metrics.perturbation import *  # noqa: F401,F403
from study.metrics.randomisation import *  # noqa: F401,F403
from study.metrics.reliability import *  # noqa: F401,F403

_PERTURBATION_NAMES = (
    "perturbation_curve",
    "aopc",
    "abpc",
    "auc",
    "aopc_morf",
    "aopc_lerf",
    "abpc_score",
    "deletion_auc",
    "insertion_auc",
    "faithfulness",
    "faithfulness_correlation",
    "average_drop_increase",
)


def _public(module, fallback=()) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:  # a module without __all__: its documented public names
        names = [name for name in fallback if hasattr(module, name)]
        globals().update({name: getattr(module, name) for name in names})
    return list(names)


__all__ = [
    *_public(perturbation, _PERTURBATION_NAMES),
    *_public(localisation),
    *_public(complexity),
    *_public(reliability),
    *_public(randomisation),
]
