"""The cost model and the planner: the hardware catalogue (`hardware.py`), FLOPs and bytes per operator of a rank's
step (`workload.py`), the plan's collective schedule priced (`traffic_model.py`) under each collective's overlap and
latency rule (`overlap.py`), the busiest expert-parallel rank from recorded routing (`routing.py`), step time, memory
and days (`cost_model.py`), answers as ranges over stated assumptions with the one each is most sensitive to
(`ranges.py`), published training runs (`published.py`) and the model's validation on them, fitted on half and held
out on the other (`validation.py`), layouts ranked (`planner.py`) and the sizes beyond which a plan is refused
(`limits.py`). It never imports the virtual cluster (trinity.simulate.virtual)."""
