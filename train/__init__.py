"""Training on real data with manualgrad's hand-written backward passes."""
