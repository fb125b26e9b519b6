"""Parallelism around the single-rank engine, kept out of model code: the one
``ParallelState`` (state.py), the step drivers (driver.py), tensor parallelism (tp.py,
tp_layers.py), expert parallelism (ep*.py, kv_relay.py), the group join and its side
channel (group.py, channel.py)."""
