"""Training algorithms: each a pure loss function plus a thin trainer on the shared loop."""
