"""hpctrain: communication- and data-efficient data-parallel training with Horovod.

    import hpctrain, hpctrain.compression
    opt = hpctrain.DistributedOptimizer(torch_optimizer, named_parameters=model.named_parameters(),
                                        compression=hpctrain.compression.AdaComp())
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["DistributedOptimizer", "compression", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `hpctrain jobs ...` and `import hpctrain` do not pay for importing torch.
    if name == "DistributedOptimizer":
        from hpctrain.optimizer import DistributedOptimizer
        return DistributedOptimizer
    if name == "compression":
        import hpctrain.compression as compression
        return compression
    raise AttributeError(f"module 'hpctrain' has no attribute {name!r}")
