"""The virtual cluster: n ranks as threads of one process behind mpi4py's buffer API (`virtual_comm.py`, with
`message_parts.py`), the faults it injects (`faults.py`) and the per-step traces of every rank's collectives
(`traces.py`). It runs the real trainer; it never imports the cost model (trinity.simulate.planning)."""
