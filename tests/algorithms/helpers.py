"""Helpers shared by the algorithm tests."""


def train_with_crash(trainer, crash_at=None):
    """Trains; with ``crash_at``, stops with a simulated crash right after that step. Returns the trainer."""
    if crash_at is not None:
        def crash(trainer, step, metrics):
            if step == crash_at:
                raise KeyboardInterrupt("simulated crash")

        trainer.add_callback(crash)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer
