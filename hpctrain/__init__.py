"""hpctrain: communication- and data-efficient data-parallel training, on Horovod or torch.distributed.

    import hpctrain, hpctrain.compression
    hpctrain.init()                                   # engine from the launcher; backend="torch" to choose
    model.to(hpctrain.device())
    opt = hpctrain.DistributedOptimizer(torch_optimizer, named_parameters=model.named_parameters(),
                                        compression=hpctrain.compression.AdaComp())
    hpctrain.broadcast_parameters(model.state_dict(), root_rank=0)
    hpctrain.broadcast_optimizer_state(opt, root_rank=0)

For one's own loop (docs/library.md): hpctrain.data.ShardDataset, hpctrain.data.AdaptiveBatchSampler,
hpctrain.AdaptiveBatch and hpctrain.StepLog; examples/ shows them together.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["init", "rank", "size", "local_rank", "local_size", "device", "broadcast_parameters",
           "broadcast_optimizer_state", "DistributedOptimizer", "ddp_comm_hook", "compression", "AdaptiveBatch",
           "StepLog", "data", "__version__"]

# name → (module, attribute), imported on first use so `import hpctrain` and `hpctrain jobs` stay fast.
_LAZY = {
    "init": ("hpctrain.comm", "init"),
    "rank": ("hpctrain.comm", "rank"),
    "size": ("hpctrain.comm", "size"),
    "local_rank": ("hpctrain.comm", "local_rank"),
    "local_size": ("hpctrain.comm", "local_size"),
    "device": ("hpctrain.comm", "pick_device"),
    "broadcast_parameters": ("hpctrain.comm", "broadcast_parameters"),
    "broadcast_optimizer_state": ("hpctrain.optimizer", "broadcast_optimizer_state"),
    "DistributedOptimizer": ("hpctrain.optimizer", "DistributedOptimizer"),
    "ddp_comm_hook": ("hpctrain.ddp", "ddp_comm_hook"),
    "compression": ("hpctrain.compression", None),
    "AdaptiveBatch": ("hpctrain.batch.adaptive", "AdaptiveBatch"),
    "StepLog": ("hpctrain.h5log", "StepLog"),
    "data": ("hpctrain.data", None),      # hpctrain.data.ShardDataset, hpctrain.data.AdaptiveBatchSampler
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hpctrain' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
