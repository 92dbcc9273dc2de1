"""`DistributedOptimizer`: Horovod's optimizer wrapper, with pluggable gradient compression.

The path of one gradient, in the order the code runs it (and the module that runs each part):

  backward → post-accumulate-grad hook (`_on_grad`, on the last of `backward_passes_per_step`
  passes; `distributed`) → `GradientSync.submit` (`sync`): NaN/Inf check (`nonfinite`: a flag
  kept on the device) and the gradient observers (batch growth's noise scale) → the compressor the
  policy picked at construction: `compressor.exchange(grad, state)` yields the rounds of
  collectives (error feedback inside: compensate → encode; dense during the warm-up, scaled for
  `op` and `gradient_predivide_factor`: `rounds`) → launched async through `comm` in a fixed
  order, every rank the same (`queue`) → `progress` waits, sends the results back into the rounds
  (decode; what was not sent stays in the residual) → the averaged gradient placed by the fusion
  mode (`fusion`): into p.grad, or aside for a deferred update → the wrapped torch optimizer's
  update (one call per parameter group, so its foreach kernels still batch the parameters).

Small tensors (and shapes a compressor cannot take) skip compression and ride one fused
dense allreduce started in `step()`, in construction order so every rank sends the same
group, with every rank's non-finite flag (`bypass`); a parameter without a gradient this step
is exchanged as zeros, so no rank waits on a collective another rank never starts (as in
Horovod). With `fusion="backward"` the parameters whose exchanges have completed are updated
from the hooks while backward continues; with `fusion="forward"` each update happens before the
parameter's module runs its next forward. Both give exactly the updates of `fusion="none"`.
Pending updates are applied by `flush()` (and by `state_dict()`): call it on every rank before
evaluation or a checkpoint. Horovod's arguments (op, gradient_predivide_factor, groups,
process_set) are checked and turned into one `Reduction` (`reduction`).

Modules: `distributed` (the optimizer class, its factory, `broadcast_optimizer_state`),
`sync` (one step's gradients: submit, progress, drain; `StepStats`; the `GradientObserver`
interface), `queue` (the fixed launch order and the rounds in flight), `rounds` (one gradient's
exchange, scaled), `bypass` (the fused small-tensor allreduce), `nonfinite` (the flags and the
error), `fusion` (the three modes), `reduction` (Horovod's reduction arguments).
"""
from __future__ import annotations

from hpctrain.optimizer.distributed import DistributedOptimizer, broadcast_optimizer_state
from hpctrain.optimizer.fusion import Fusion
from hpctrain.optimizer.nonfinite import NonFiniteGradientError, squared_norm
from hpctrain.optimizer.sync import GradientObserver, StepStats

__all__ = ["DistributedOptimizer", "Fusion", "GradientObserver", "NonFiniteGradientError", "StepStats",
           "broadcast_optimizer_state", "squared_norm"]
