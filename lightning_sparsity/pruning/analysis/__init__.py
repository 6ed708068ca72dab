"""The channel analysis behind the export.

Its modules, in the order data flows through them:

* `graph` and `capture`: the graph (``torch.fx`` in eval mode, opaque leaves and
  regions for what fx cannot follow);
* `leaves`: zoo modules proven to behave like a conv, a Linear or a per-channel layer;
* `spaces`, `fxargs`, `rules`, `reshapes`: channel spaces and the per-op
  rules;
* `coupling`: the walk and the constraint solver that turn the rules into a
  [`ChannelPlan`][lightning_sparsity.pruning.analysis.coupling.ChannelPlan].

Nothing here imports the surgery or the export above it, except the registry of shrink functions
(`lightning_sparsity.pruning.surgery`), which the leaf checks use.
"""
