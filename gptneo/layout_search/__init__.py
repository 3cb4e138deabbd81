"""Layout search: an analytic cost model of a training step and a CP-SAT search over layouts."""
