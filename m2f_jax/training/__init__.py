"""Training: optimizer.py (AdamW groups, schedules), state.py (TrainState), step.py (jitted
update), checkpointing.py (orbax CheckpointManager, restore_variables), loop.py (train)."""
