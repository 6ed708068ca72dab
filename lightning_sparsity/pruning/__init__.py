"""Physical pruning: fx coupling graph, layer surgery, export, save/load. No Lightning import."""
