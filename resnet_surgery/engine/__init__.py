"""The engine: find the residual blocks in the fx graph and rewrite them (nothing here trains, exports or reads folders)."""
