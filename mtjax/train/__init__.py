"""Training: the state, the jitted data-parallel step, the loop."""
