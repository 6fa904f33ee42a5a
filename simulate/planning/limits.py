"""The planner's limits (`trinity plan`, trinity.simulate.planning.planner): a search beyond them would take minutes, so it
is refused at once, in one line naming the limit. No imports, so that `trinity -h` can show them cheaply."""

MAX_GPUS = 1_000_000
MAX_SEQ_LEN = 262_144  # the longest context of the presets (trinity-large); the memory model's time grows with it
MAX_SEQUENCES = 10_000_000  # sequences per step
MAX_EXAMINED = 20_000  # layouts tested against the rules, over every micro-batch size
MAX_PREDICTIONS = 3_000  # predictions (a few ms each): layouts × micro-batch sizes × recompute × batch sizes
