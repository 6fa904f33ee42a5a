"""The cost model and the planner: the hardware catalogue (`hardware.py`), FLOPs and bytes per operator of a rank's
step (`workload.py`), the plan's collective schedule priced (`traffic_model.py`), the busiest expert-parallel rank
from recorded routing (`routing.py`), step time, memory and days (`cost_model.py`), layouts ranked (`planner.py`)
and the sizes beyond which a plan is refused (`limits.py`). It never imports the virtual cluster
(trinity.simulate.virtual)."""
