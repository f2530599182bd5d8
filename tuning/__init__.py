"""Ray Tune sweeps over the anti-collapse knobs: named search spaces (``tuning.spaces``), the
sweep CLI (``tuning.sweep``), each trial's Train run (``tuning.trial``), MLflow parent/child
runs (``tuning.runs``), the objective (``tuning.objective``) and the report (``tuning.report``).
"""
