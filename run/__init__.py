"""The run itself, the same for one process and for every rank of a cluster: the run file (`run_config.py`), the
trainer's loop (`trainer.py`) and everything before its first step (`startup.py`: the ranks' agreement, the memory
check, the run folder's lock `run_lock.py`, each rank's state from its spans `rank_state.py`), the metrics log
(`metrics_log.py`) and preemption (`preemption.py`). The parallel machinery it drives is trinity.distributed's."""
