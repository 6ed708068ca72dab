"""Pure tensor maths: groups, penalties and proximal maps. No Lightning import."""
