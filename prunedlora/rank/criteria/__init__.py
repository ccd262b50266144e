"""How PrunedLoRA scores rank components: one ``Criterion`` class per score, in a registry.

Every criterion returns one score per *active* component; lower means cheaper to remove. Global
allocation ranks scores across modules, so a score must be an estimated loss increase with a common
scale (see why ``obs-paper``'s is not). ``obs`` names the variant the quality protocol measured best.

The shipped criteria, one module each (its docstring derives it): ``obs-paper``, ``obs-fisher``,
``obs-input`` (alias ``obs``), ``sensitivity``, ``taylor``, ``taylor-ema``, ``activation``,
``magnitude``. Add one with a subclass of ``Criterion`` and ``register`` (docs/training.md).
"""

from __future__ import annotations

from prunedlora.rank.criteria.activation import Activation
from prunedlora.rank.criteria.base import Criterion
from prunedlora.rank.criteria.magnitude import Magnitude
from prunedlora.rank.criteria.obs_fisher import ObsFisher
from prunedlora.rank.criteria.obs_input import ObsInput
from prunedlora.rank.criteria.obs_paper import ObsPaper
from prunedlora.rank.criteria.registry import RECOVERIES, find, names, register, unregister
from prunedlora.rank.criteria.sensitivity import Sensitivity
from prunedlora.rank.criteria.taylor import Taylor
from prunedlora.rank.criteria.taylor_ema import TaylorEma

# registration order is the order the names are listed in messages
for _shipped in (ObsPaper, ObsFisher, ObsInput, Sensitivity, Taylor, TaylorEma, Activation, Magnitude):
    register(_shipped)

__all__ = ["RECOVERIES", "Criterion", "find", "names", "register", "unregister"]
